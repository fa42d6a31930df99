"""The report: entries, statuses, coverage, grouping and every renderer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyNet, trained
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

import weightport as wp
from weightport.report import group_names


@pytest.fixture
def report() -> wp.TransferReport:
    state = trained(num_classes=1000).state_dict()
    state["unused.weight"] = torch.zeros(2)
    return wp.transfer(state, TinyNet(), rules=[wp.drop("blocks.1.**")])


def test_every_target_has_exactly_one_entry_and_status(report):
    names = [e.target for e in report.entries]
    assert names == list(TinyNet().state_dict())
    assert all(e.status in ("loaded", "adapted", "fresh") for e in report.entries)
    assert len(report.loaded) + len(report.adapted) + len(report.fresh) == len(report.entries)
    assert report.unused == ("unused.weight", "fc.weight", "fc.bias") or set(report.unused) == {
        "unused.weight",
        "fc.weight",
        "fc.bias",
    }
    assert set(report.dropped) == {"blocks.1.0.weight", "blocks.1.0.bias"}


def test_coverage_counts_parameter_elements_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(10, 10, bias=False)  # 100 elements
            self.b = torch.nn.Linear(10, 10, bias=False)
            self.b.weight = self.a.weight  # tied: counted once
            self.c = torch.nn.Linear(10, 1, bias=False)  # 10 elements, fresh
            self.register_buffer("big", torch.zeros(1000))  # buffers do not count

    r = wp.transfer({"a.weight": torch.ones(10, 10)}, Tied())
    assert r.coverage == pytest.approx(100 / 110)


def test_summary_groups_names(report):
    text = report.summary()
    assert "coverage" in text and "fresh (shape mismatch): fc.weight, fc.bias" in text
    assert "fresh (dropped): blocks.1.0.weight, blocks.1.0.bias" in text
    assert group_names([f"blocks.{i}.attn.qkv.weight" for i in range(12)]) == ["blocks.{0..11}.attn.qkv.weight"]
    assert group_names(["l.1.w", "l.3.w", "l.4.w"]) == ["l.{1,3,4}.w"]
    assert group_names(["a.0.b.0", "a.0.b.1", "a.1.b.0"]) == ["a.0.b.{0..1}", "a.1.b.0"]  # exact, no cartesian lie


def test_table_shows_both_shapes_and_reasons(report):
    text = str(report)
    line = next(ln for ln in text.splitlines() if ln.startswith("fc.weight"))
    assert "fresh" in line and "(1000, 8) -> (10, 8)" in line and "shape mismatch" in line


def test_machine_readable_renderers(report):
    d = json.loads(report.to_json())
    assert d["counts"] == {"loaded": len(report.loaded), "adapted": 0, "fresh": len(report.fresh)}
    fc = next(e for e in d["entries"] if e["target"] == "fc.weight")
    assert fc["source_shape"] == [1000, 8] and fc["reason"] == "shape mismatch"
    assert d["source"]["kind"] == "dict" and d["applied"] is True
    md = report.to_markdown()
    assert "| fc.weight | fresh |" in md
    html = report._repr_html_()
    assert "<table " in html and "fc.weight" in html
    console = Console(record=True, width=200)
    console.print(report)
    assert "fc.weight" in console.export_text()


def test_library_logs_and_never_prints(capsys, report):
    wp.transfer(trained().state_dict(), TinyNet())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_entries_are_a_sequence_of_entries_kept_as_rows(report):
    from weightport.report import EntryTable

    entries = report.entries
    assert isinstance(entries, EntryTable)
    as_list = list(entries)
    assert all(isinstance(e, wp.Entry) for e in as_list)
    assert len(entries) == len(as_list) and entries[0] == as_list[0] and entries[-1] == as_list[-1]
    assert entries[1:3] == as_list[1:3]
    assert entries == tuple(as_list) and entries == as_list and entries != as_list[:-1]
    with pytest.raises(IndexError):
        entries[len(as_list)]
    assert report[as_list[2].target] == as_list[2]
    with pytest.raises(KeyError):
        report["no.such.tensor"]
    assert report.counts() == {s: len(getattr(report, s)) for s in ("loaded", "adapted", "fresh")}


def test_a_report_given_entries_stores_them_as_a_table():
    e1 = wp.Entry("a", "loaded", ("a",), None, (), (2,), (2,), None, None, 2, True)
    e2 = wp.Entry("b", "fresh", (), None, (), None, (3,), "missing", None, 3, True)
    r = wp.TransferReport((e1, e2))
    assert list(r.entries) == [e1, e2]
    assert r.loaded == [e1] and r.fresh == [e2]
    assert r.coverage == pytest.approx(2 / 5)
    assert r.counts() == {"loaded": 1, "adapted": 0, "fresh": 1}
    assert r == wp.TransferReport([e1, e2])


def test_a_report_survives_pickle_and_deepcopy(report):
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(report)), copy.deepcopy(report)):
        assert clone == report and list(clone.entries) == list(report.entries)
        assert clone.summary() == report.summary()


def _parts_table():
    from weightport.report import EntryTable, LoadedColumns

    loaded = LoadedColumns(["b", "d"], ["src.b", "src.d"], ["rule b", None], [(2, 3), (4,)], [True, False])
    other = [
        ("a", "fresh", (), None, (), None, (5,), "missing", None, 5, True),
        ("c", "adapted", ("src.c",), None, ("in_channels 3->1",), (3, 3), (1, 3), None, None, 3, True),
    ]
    return EntryTable.from_parts(["a", "b", "c", "d"], other, loaded), other


def test_a_table_from_loaded_columns_lists_every_entry_in_the_model_order():
    table, other = _parts_table()
    b = wp.Entry("b", "loaded", ("src.b",), "rule b", (), (2, 3), (2, 3), None, None, 6, True)
    d = wp.Entry("d", "loaded", ("src.d",), None, (), (4,), (4,), None, None, 4, False)
    assert list(table) == [wp.Entry(*other[0]), b, wp.Entry(*other[1]), d]
    assert len(table) == 4 and table[1] == b and table[-1] == d


def test_counts_coverage_and_summary_read_the_loaded_columns_without_making_their_rows():
    table, _ = _parts_table()
    report = wp.TransferReport(table)
    assert report.counts() == {"loaded": 2, "adapted": 1, "fresh": 1}
    assert report.coverage == pytest.approx((6 + 3) / (5 + 6 + 3))  # d is a buffer
    assert [e.target for e in report.fresh] == ["a"] and [e.target for e in report.adapted] == ["c"]
    assert "2 loaded, 1 adapted, 1 fresh of 4" in report.summary()
    assert table._all is None  # nothing above listed the loaded entries one by one
    assert [e.target for e in report.loaded] == ["b", "d"]
    assert report == wp.TransferReport(list(table))


def test_a_table_from_parts_refuses_names_that_do_not_add_up():
    from weightport.report import EntryTable, LoadedColumns

    with pytest.raises(ValueError, match="3 names for 0 rows and 2 loaded"):
        EntryTable.from_parts(
            ["a", "b", "c"], [], LoadedColumns(["a", "b"], ["a", "b"], [None, None], [(), ()], [True] * 2)
        )


def test_names_with_unicode_digits_or_huge_integers_group_without_failing():
    assert group_names(["x.²", "x.³"]) == ["x.²", "x.³"]  # digits to str.isdigit, not to int
    assert group_names(["b.0.w", "b.1000000000.w"]) == ["b.{0,1000000000}.w"]  # no billion-long range
    assert group_names(["b.1.w", "b.2.w", "b.3.w"]) == ["b.{1..3}.w"]
    digits = "9" * 5000  # int() refuses strings this long
    assert group_names([f"a.{digits}", "a.1"]) == [f"a.{digits}", "a.1"]


def test_the_report_escapes_terminal_control_characters_in_names():
    hostile = "fc.weight\x1b]52;c;ZWNobyBoaQ==\x07\x1b[2K\r"
    state = {hostile: torch.zeros(2), "bias": torch.zeros(2)}
    report = wp.plan(state, torch.nn.Linear(2, 2)).report
    for text in (report.summary(), str(report), report.to_markdown(), report._repr_html_()):
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text
        assert "\\x1b]52" in text
    assert report.unused == (hostile,)  # the data keeps the name as it is
    assert json.loads(report.to_json())["unused"] == [hostile]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8, unique=True))
def test_rendering_a_report_never_fails_whatever_the_names(names):
    state = {n: torch.zeros(1) for n in names}
    report = wp.plan(state, torch.nn.Linear(1, 1), allow_empty=True).report
    for text in (report.summary(), str(report), report.to_markdown()):
        assert not any(ord(c) < 0x20 and c != "\n" for c in text)
    assert len(group_names(names)) <= len(names)


def test_torch_and_transformers_words_are_views_of_the_entries():
    state = trained().state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["dropped.weight"] = torch.zeros(1)
    state["blocks.0.0.weight"] = torch.zeros(8, 8, 1, 1)
    report = wp.plan(state, TinyNet(), rules=[wp.drop("dropped.**")]).report
    assert report.missing_keys == ["fc.bias"]
    assert set(report.unexpected_keys) == {"blocks.0.0.weight", "extra.weight"}  # the refused one too
    assert "dropped.weight" not in report.unexpected_keys
    assert report.mismatched_keys == [("blocks.0.0.weight", (8, 8, 1, 1), (8, 8, 3, 3))]


def test_fresh_parameters_are_announced_at_warning_and_in_the_report(caplog):
    import logging

    state = trained().state_dict()
    with caplog.at_level(logging.WARNING, logger="weightport"):
        report = wp.transfer(state, TinyNet(num_classes=3))  # the head's shape differs: fresh
    note = "2 parameter(s) not loaded, keeping their initialisation: fc.weight, fc.bias"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [note]
    assert note in report.warnings and f"warning: {note}" in report.summary()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightport"):
        report = wp.transfer(state, TinyNet())
    assert not caplog.records and report.fresh_parameters_note() is None
