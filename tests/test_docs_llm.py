"""docs/llm.md's worked example runs as written (a tiny Llama folder into torchtune, litgpt and Meta's layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "llm.md"


@pytest.mark.slow
def test_the_worked_example_in_docs_llm_runs(tmp_path, monkeypatch):
    pytest.importorskip("torchtune")
    pytest.importorskip("litgpt")
    pytest.importorskip("transformers")
    code = DOC.read_text().split("## Worked example")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})  # asserts the round trip's logits itself
    assert (tmp_path / "tiny-llama" / "config.json").is_file()
