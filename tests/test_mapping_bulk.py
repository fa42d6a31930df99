"""``Mapping.resolve_all`` (one resolution per key shape) gives exactly what ``resolve`` gives per key."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightport as wp
from weightport.mapping import _bulk
from weightport.mapping.files import list_mappings, load_mapping


def _layered(n: int = 80) -> list[str]:
    """Keys with integer segments at several places, enough of them to take the bulk path."""
    keys = [
        f"model.layers.{i}.mlp.experts.{e}.proj_{p}.weight" for i in range(n // 8) for e in range(4) for p in range(2)
    ]
    keys += [f"{i}.weight" for i in range(12)]  # integer first segment (nn.Sequential)
    keys += ["blocks.007.norm.bias", "blocks.7.norm.bias", "blocks.70.norm.bias", "head.weight"]
    keys += [f"blocks.{i}.mlp.0.weight" for i in range(12)] + [f"blocks.{i}.mlp.10.weight" for i in range(3)]
    return keys


def _same(mapping: wp.Mapping, keys: list[str]) -> None:
    assert mapping.resolve_all(keys) == [mapping.resolve(k) for k in keys]


MAPPINGS = {
    "renames": [
        wp.rename("model.layers.{i}.mlp.experts.{e}.proj_{p}.weight", "blocks.{i}.moe.{e}.w{p}"),
        wp.strip_prefix("model."),
    ],
    "digit literal": [wp.rename("blocks.{i}.mlp.0.weight", "blocks.{i}.fc1.weight"), wp.drop("blocks.{i}.mlp.**")],
    "digit literal in a segment": [wp.rename("blocks.{i}.mlp.{j}0.weight", "x.{i}.{j}")],
    "integer first segment": [wp.rename("{i}.weight", "seq.{i}.w"), wp.rename("0.weight", "first.w")],
    "offset": [wp.rename("blocks.{i}.mlp.{j}.weight", "blocks.{i+1}.fc.{j}.weight")],
    "multi": [wp.rename("model.{rest*}", "m.{rest}"), wp.add_prefix("p.")],
    "wildcards": [wp.drop("**.proj_1.*"), wp.rename("*.layers.{i}.**", "L{i}")],
    "regex": [wp.rename("re:model\\.layers\\.(?P<i>[0-9])\\..*", "few.{i}")],
    "backref": [wp.rename("blocks.{i}.mlp.{i}.weight", "diag.{i}")],
    "adjacent placeholders": [wp.rename("blocks.{a}{b}.norm.bias", "n.{a}.{b}")],
    "split": [wp.split("model.layers.{i}.mlp.experts.{e}.proj_0.weight", ["a.{i}.{e}", "b.{i}.{e}"], dim=0)],
    "fuse": [
        wp.fuse(
            ["model.layers.{i}.mlp.experts.{e}.proj_0.weight", "model.layers.{i}.mlp.experts.{e}.proj_1.weight"],
            "f.{i}.{e}",
        )
    ],
    "braces": [wp.rename("model.layers.{i}.{rest*}", "{{x}}.{i}.{rest}")],
}


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_resolve_all_equals_resolve(name: str) -> None:
    _same(wp.Mapping(MAPPINGS[name]), _layered())


def test_source_prefix_is_removed_first() -> None:
    m = wp.Mapping([wp.rename("layers.{i}.{rest*}", "L.{i}.{rest}")], source_prefix="model.")
    _same(m, _layered() + ["layers.3.x"])


def test_bulk_path_is_taken_and_exact_for_digit_blind_mappings() -> None:
    m = wp.Mapping(MAPPINGS["renames"])
    assert m.shape_regex is not None
    keys = _layered(800)
    calls = []
    original = m.resolve_stripped
    m.resolve_stripped = lambda k: calls.append(k) or original(k)  # type: ignore[method-assign]
    try:
        got = m.resolve_all(keys)
    finally:
        del m.resolve_stripped
    assert got == [m.resolve(k) for k in keys]
    assert len(calls) < len(keys) // 10  # resolved once per shape, not per key


@pytest.mark.parametrize("name", ["regex", "backref", "adjacent placeholders"])
def test_mappings_that_look_at_digits_are_resolved_key_by_key(name: str) -> None:
    assert wp.Mapping(MAPPINGS[name]).shape_regex is None


def test_digit_literals_keep_their_segments_literal() -> None:
    inner, first = wp.Mapping(MAPPINGS["digit literal"]).shape_regex  # type: ignore[misc]
    text = "\nblocks.3.mlp.0.weight\nblocks.3.mlp.10.weight\nblocks.3.mlp.7.weight\n"
    shapes = first.sub("\n#", inner.sub(".#", text))
    assert shapes == "\nblocks.#.mlp.0.weight\nblocks.#.mlp.10.weight\nblocks.#.mlp.#.weight\n"


def test_keys_with_newlines_or_the_mark_fall_back() -> None:
    m = wp.Mapping(MAPPINGS["renames"])
    keys = _layered() + ["odd\nname.3", f"odd{_bulk._MARK}.4"]
    _same(m, keys)


def test_shipped_mappings_resolve_the_same_in_bulk() -> None:
    for name in list_mappings():
        m = load_mapping(name)
        keys = []
        for rule in m.rules:  # keys shaped like what each rule expects, several integers each
            for pattern in rule.patterns:
                if not pattern.tokens:
                    continue
                for i, j in itertools.product(range(1, 4), range(1, 3)):  # from 1: some templates say {s-1}
                    values = (t if isinstance(t, str) else str(i if k % 2 else j) for k, t in enumerate(pattern.tokens))
                    keys.append("".join(values))
        keys = keys * (1 + 64 // max(1, len(keys)))
        _same(m, keys)


_SEGMENT = st.one_of(
    st.sampled_from(["0", "1", "7", "10", "007", "blocks", "mlp", "w", "weight", "proj_0", "x1", "1x"]),
    st.integers(0, 300).map(str),
)
_KEY = st.lists(_SEGMENT, min_size=1, max_size=6).map(".".join)
_PIECE = st.sampled_from(["blocks", "mlp", "0", "1", "weight", "{i}", "{j}", "*", "{r*}", "**", "x{i}", "{i}0"])
_PATTERN = st.lists(_PIECE, min_size=1, max_size=5).map(".".join)


def _rule(pattern: str) -> wp.mapping.Rule | None:
    names = sorted({n for n in ("i", "j", "r") if "{" + n in pattern})
    try:
        return wp.rename(pattern, "t." + ".".join("{" + n + "}" for n in names) if names else "t.const")
    except wp.WeightportError:
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns=st.lists(_PATTERN, min_size=1, max_size=4), keys=st.lists(_KEY, min_size=1, max_size=40))
def test_resolve_all_equals_resolve_for_random_rules_and_keys(patterns: list[str], keys: list[str]) -> None:
    rules = [r for p in patterns if (r := _rule(p)) is not None]
    m = wp.Mapping(rules)
    keys = (keys * (1 + _bulk._SMALL // len(keys)))[: max(_bulk._SMALL, len(keys))]  # long enough for the bulk path
    _same(m, keys)
