"""weightport._tuples: named tuples in bulk from columns."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from weightport._tuples import rows


class Pair(NamedTuple):
    a: str
    b: int = 0


def test_rows_equal_the_named_tuples_made_one_by_one():
    made = list(rows(Pair, ["x", "y"], [1, 2]))
    assert made == [Pair("x", 1), Pair("y", 2)] and all(type(p) is Pair for p in made)
    assert made[1].b == 2


def test_rows_refuse_a_missing_column():
    with pytest.raises(TypeError, match="Pair has 2 fields, got 1 columns"):
        rows(Pair, ["x"])
