"""The notebook view of reports and plans (``to_html()``, ``_repr_html_``)."""

from __future__ import annotations

from html.parser import HTMLParser

import torch
from conftest import TinyNet, trained
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightport as wp
from weightport.report import Entry, EntryTable, LoadedColumns, TransferReport


class _Page(HTMLParser):
    """The sections in order (with whether each is open), every tag, and the text of each section."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[tuple[str, bool]] = []
        self.tags: list[str] = []
        self.text: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if "data-section" in found:
            self.sections.append((str(found["data-section"]), "open" in found))

    def handle_data(self, data: str) -> None:
        if self.sections:
            name = self.sections[-1][0]
            self.text[name] = self.text.get(name, "") + data


def _mixed_plan() -> wp.TransferPlan:
    """A plan with every kind of row: a bias the source lacks (fresh), a 1-channel stem (adapted),
    an extra key (unused), an auxiliary head (dropped) and the rest loaded."""
    state = trained().state_dict()
    del state["fc.bias"]
    state["aux.weight"] = torch.zeros(3)
    state["extra.weight"] = torch.zeros(3)
    return wp.plan(state, TinyNet(in_chans=1), on_mismatch="adapt", rules=[wp.drop("aux.*")])


def test_sections_show_the_summary_and_what_deserves_a_look_first_and_fold_the_loaded_rows():
    plan = _mixed_plan()
    page = _Page(plan.report.to_html())
    assert page.sections == [
        ("summary", False),
        ("fresh", True),
        ("adapted", True),
        ("unused", True),
        ("dropped", True),
        ("loaded", False),
    ]
    assert page.tags.count("details") == 5 and "table" in page.tags
    assert plan.report.summary().splitlines()[0] in page.text["summary"]
    assert "fc.bias" in page.text["fresh"] and "missing" in page.text["fresh"]
    assert "conv1.weight" in page.text["adapted"] and "in_channels" in page.text["adapted"]
    assert "extra.weight" in page.text["unused"] and "aux.weight" in page.text["dropped"]
    assert "bn1.running_mean" in page.text["loaded"]


def test_rows_that_differ_only_in_integer_segments_share_one_line_with_grouped_names():
    names = [f"blocks.{i}.attn.qkv.weight" for i in range(12)]
    loaded = LoadedColumns(names, names, [None] * 12, [(6, 2)] * 12, [True] * 12)
    fresh = [(f"heads.{i}.bias", "fresh", (), None, (), None, (2,), "missing", None, 2, True) for i in range(3)]
    table = EntryTable.from_parts(names + [r[0] for r in fresh], fresh, loaded)
    page = _Page(TransferReport(table, unused=("old.0.w", "old.1.w")).to_html())
    assert "blocks.{0..11}.attn.qkv.weight" in page.text["loaded"] and "blocks.3." not in page.text["loaded"]
    assert "heads.{0..2}.bias" in page.text["fresh"] and "old.{0..1}.w" in page.text["unused"]


def test_to_html_is_what_the_notebook_shows_and_a_plan_says_it_is_a_preview():
    plan = _mixed_plan()
    assert plan._repr_html_() == plan.to_html()
    assert "preview, nothing applied yet" in plan.to_html()
    report = plan.apply()
    assert report._repr_html_() == report.to_html()
    assert "preview" not in _Page(report.to_html()).text["summary"]
    assert "preview" in _Page(plan.to_html()).text["summary"]  # still its preview, and saying so


def test_every_name_is_escaped():
    hostile = "<script>alert(1)</script>"
    attribute = "x' onmouseover='alert(2)"
    entries = [
        Entry(f"{hostile}.weight", "fresh", (), None, (), None, (2,), "missing", None, 2, True),
        Entry("<img src=x onerror=alert(3)>", "adapted", (attribute,), None, ("pad",), (1,), (2,), None, None, 2),
        Entry("ok.\x1b]52;c;ZWNobw==\x07", "loaded", ("ok",), None, (), [2], [2], None, None, 2),  # type: ignore[arg-type]
    ]
    report = TransferReport(entries, unused=(hostile,), dropped=(attribute,), unused_reasons={hostile: hostile})
    text = report.to_html()
    page = _Page(text)
    assert set(page.tags) <= {"div", "details", "summary", "span", "table", "thead", "tbody", "tr", "th", "td", "code"}
    assert hostile not in text and attribute not in text and "\x1b" not in text and "\x07" not in text
    assert hostile in page.text["fresh"] and hostile in page.text["unused"]  # shown as text
    assert attribute in page.text["dropped"] and "<img src=x onerror=alert(3)>" in page.text["adapted"]


def _large(names: list[str]) -> tuple[str, _Page]:
    n = len(names)
    loaded = LoadedColumns(names, names, [None] * n, [(4, 4)] * n, [True] * n)
    text = TransferReport(EntryTable.from_parts(names, [], loaded), unused=tuple(f"u{i}" for i in range(n))).to_html()
    page = _Page(text)
    assert page.sections == [("summary", False), ("unused", True), ("loaded", False)]
    assert len(text) < 1_000_000 and page.tags.count("tr") < 420  # a page a notebook holds, not 200k rows
    return text, page


def test_a_large_report_folds_its_loaded_rows_and_groups_them():
    n = 100_000
    _, page = _large([f"layers.{i}.weight" for i in range(n)])
    assert "layers.{0..99999}.weight" in page.text["loaded"] and "layers.7." not in page.text["loaded"]


def test_a_large_report_whose_names_do_not_group_shows_the_first_rows_and_counts_the_rest():
    n = 100_000
    _, page = _large([f"w_{i}" for i in range(n)])  # no integer segment: nothing groups
    assert "w_199" in page.text["loaded"] and "w_200" not in page.text["loaded"]
    assert f"… {n - 200} more row(s) not shown" in page.text["loaded"]
    assert f"… {n - 200} more row(s) not shown" in page.text["unused"]


def test_a_report_with_no_rows_renders():
    page = _Page(TransferReport([]).to_html())
    assert page.sections == [("summary", False)]


def test_a_plan_into_a_submodule_renders_its_preview():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    plan = wp.plan(nn.Linear(2, 2).state_dict(), model, into="1")
    assert ("loaded", False) in _Page(plan.to_html()).sections


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8, unique=True))
def test_any_names_render_as_text_never_as_markup(names):
    entries = [Entry(n, "fresh", (), None, (), None, (1,), "missing", None, 1, True) for n in names]
    page = _Page(TransferReport(entries, unused=tuple(names)).to_html())
    assert set(page.tags) <= {"div", "details", "summary", "span", "table", "thead", "tbody", "tr", "th", "td", "code"}
    assert [s for s, _ in page.sections] == ["summary", "fresh", "unused"]
