"""The shipped Hugging Face -> torchtitan mappings (hf.llama->torchtitan.llama, hf.qwen3->torchtitan.qwen3), on
tiny random models (2 layers, grouped-query attention, every parameter randomised), three ways: the state dict
weightport makes equals torchtitan's own ``StateDictAdapter.from_hf`` bit for bit (and the inverse equals
``to_hf``); the ported torchtitan model's logits equal transformers' (< 1e-5); the round trip back is
bit-identical. torchtitan's default fused attention (one ``wqkv`` parameter, saved as ``wq``/``wk``/``wv``) is
reached through its own loading hook."""

from __future__ import annotations

import pytest
import torch

import weightport as wp
from tests.llm_models import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, hf_logits, hf_model, tokens
from weightport.mapping.verify import map_state_dict

pytest.importorskip("torchtitan")
pytestmark = pytest.mark.slow  # importing torchtitan alone takes about ten seconds

FACTS = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden": HIDDEN}
FAMILIES = {  # HF family -> (mapping, torchtitan builder, its state dict adapter)
    "llama": (
        "hf.llama->torchtitan.llama",
        "llama3",
        "torchtitan.models.llama3.state_dict_adapter:Llama3StateDictAdapter",
    ),
    "mistral": (
        "hf.llama->torchtitan.llama",
        "llama3",
        "torchtitan.models.llama3.state_dict_adapter:Llama3StateDictAdapter",
    ),
    "qwen3": (
        "hf.qwen3->torchtitan.qwen3",
        "qwen3",
        "torchtitan.models.qwen3.state_dict_adapter:Qwen3StateDictAdapter",
    ),
}


def _titan(family: str, **kwargs):
    from tests import titan_models

    return getattr(titan_models, FAMILIES[family][1])(**kwargs)


def _adapter(family: str, config):
    import importlib

    module, _, name = FAMILIES[family][2].partition(":")
    return getattr(importlib.import_module(module), name)(config, None)


def _mapping(family: str) -> wp.Mapping:
    return wp.load_mapping(FAMILIES[family][0])


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mapped_state_dict_equals_torchtitans_own_from_hf(family):
    hf = hf_model(family)
    state = _hf_state(hf)
    _, config = _titan(family)
    ours = map_state_dict(state, _mapping(family).bind(FACTS))
    theirs = _adapter(family, config).from_hf(dict(state))
    assert _equal(ours, theirs)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fuse_qkv", [True, False], ids=["fused", "separate"])
def test_port_into_torchtitan_equals_from_hf_and_matches_transformers_logits(family, fuse_qkv):
    hf = hf_model(family)
    model, config = _titan(family, fuse_qkv=fuse_qkv, seed=1)
    report = wp.transfer(hf, model, mapping=FAMILIES[family][0], strict=True)  # facts from the model itself
    theirs = _adapter(family, config).from_hf(_hf_state(hf))
    assert _equal(dict(model.state_dict()), theirs)  # torchtitan's checkpoint names, bit for bit
    assert len(report.entries) == len(list(model.parameters()))
    if fuse_qkv:
        wqkv = report.entries[1]
        assert wqkv.target == "layers.0.attention.qkv_linear.wqkv.weight" and wqkv.status == "loaded"
        assert any("loading hook" in op for op in wqkv.ops) and len(wqkv.sources) == 3
    ids = tokens()
    from tests.titan_models import logits

    diff = (logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_back_to_hugging_face_is_bit_identical_and_equals_to_hf(family):
    hf = hf_model(family)
    model, config = _titan(family, seed=1)
    mapping = _mapping(family)
    wp.transfer(hf, model, mapping=mapping, strict=True)
    back = hf_model(family, seed=2)
    wp.transfer(model, back, mapping=mapping.inverse(), facts=FACTS, strict=True)
    assert _equal(_hf_state(back), _hf_state(hf))
    titan_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ours = map_state_dict(titan_state, mapping.inverse().bind(FACTS))
    assert _equal(ours, _adapter(family, config).to_hf(titan_state))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("titan_tied", [True, False], ids=["titan-tied", "titan-untied"])
def test_a_checkpoint_without_lm_head_fills_it_from_the_embeddings(tmp_path, family, titan_tied):
    hf = hf_model(family, tie=True)
    hf.save_pretrained(tmp_path)  # tied: the file has no lm_head.weight
    model, _ = _titan(family, tie=titan_tied, seed=1)
    report = wp.transfer(tmp_path, model, mapping=FAMILIES[family][0], strict=True)  # facts from config.json
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)
    assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight)
    if not titan_tied:
        head = next(e for e in report.entries if e.target == "lm_head.weight")
        assert head.status == "loaded" and head.sources == ("model.embed_tokens.weight",)
    ids = tokens()
    from tests.titan_models import logits

    assert (logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < 1e-5


def test_a_wrong_head_count_is_caught_by_the_logits():
    hf = hf_model("llama")
    model, _ = _titan("llama", seed=1)
    wp.transfer(hf, model, mapping="hf.llama->torchtitan.llama", facts={"kv_heads": 1}, strict=True)
    ids = tokens()
    from tests.titan_models import logits

    assert (logits(model, ids) - hf_logits(hf, ids)).abs().max().item() > 1e-3
