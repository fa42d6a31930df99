"""The shipped mapping hf.llama->litgpt.llama, checked against litgpt itself on every Llama-family model.

For each family (Llama 3 with grouped-query attention, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k
norms, Gemma with multi-query attention and tied embeddings), on tiny models whose every parameter is random:
(a) the litgpt state dict weightport writes equals, bit for bit, what litgpt's own ``convert_hf_checkpoint``
functions make of the same Hugging Face checkpoint; (b) litgpt's GPT then gives the logits of the
transformers model; (c) the inverted mapping brings the weights back into the transformers model bit for
bit, equal to litgpt's own ``convert_lit_checkpoint``.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import pytest
import torch
from torch import nn

import weightport as wp
from tests.llm_models import FAMILIES, hf_logits, hf_model, tokens
from weightport.mapping.verify import checkpoint_state, map_state_dict

pytest.importorskip("transformers")
litgpt = pytest.importorskip("litgpt")
from litgpt.scripts import convert_hf_checkpoint as lit_in  # noqa: E402
from litgpt.scripts import convert_lit_checkpoint as lit_out  # noqa: E402

MAPPING = "hf.llama->litgpt.llama"

# litgpt picks its converter, its RMSNorm (Gemma's adds 1 to the weight) and its MLP by the config's name
LIT_NAMES = {
    "llama": "Llama-3.2-1B",
    "mistral": "Mistral-7B-v0.1",
    "qwen2": "Qwen2.5-0.5B",
    "qwen3": "Qwen3-0.6B",
    "gemma": "Gemma-2b",
}


def lit_config(family: str, hf: nn.Module) -> litgpt.Config:
    """litgpt's config of ``family`` sized like the transformers model ``hf`` (same rope base and norm eps)."""
    c = hf.config
    return litgpt.Config.from_name(
        LIT_NAMES[family],
        block_size=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        padded_vocab_size=c.vocab_size,
        n_layer=c.num_hidden_layers,
        n_embd=c.hidden_size,
        intermediate_size=c.intermediate_size,
        n_head=c.num_attention_heads,
        n_query_groups=c.num_key_value_heads,
        head_size=c.head_dim,
        norm_eps=c.rms_norm_eps,
        rope_base=int(c.rope_parameters["rope_theta"]),
        rope_adjustments=None,
        sliding_window_size=None,
        sliding_window_indices=None,
    )


def lit_model(family: str, hf: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    return litgpt.GPT(lit_config(family, hf)).eval()


@functools.cache
def _hf(family: str, tie: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The family's random transformers model and its checkpoint (what save_pretrained writes: a tied
    lm_head, Gemma's, is not in it)."""
    model = hf_model(family, tie=tie)
    return model, checkpoint_state(model)


def litgpt_from_hf(family: str, config: litgpt.Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """litgpt's own convert_hf_checkpoint of ``state``, with the copy function it picks for the model."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict = defaultdict(dict)
    if family == "qwen2":
        lit_in.copy_weights_qwen_2_5(config, qkv, out, dict(state))
    elif family == "qwen3":
        lit_in.copy_weights_qwen_3(config, qkv, out, dict(state))
    else:
        lit_in.copy_weights_hf_llama(config, qkv, out, dict(state))
    return out


def hf_from_litgpt(family: str, config: litgpt.Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """litgpt's own convert_lit_checkpoint of ``state`` (for Gemma it leaves the tied lm_head out)."""
    out: dict[str, torch.Tensor] = {}
    if family == "qwen2":
        lit_out.copy_weights_qwen_2_5(config, out, dict(state))
    elif family == "qwen3":
        lit_out.copy_weights_qwen_3(config, out, dict(state))
    else:
        lit_out.copy_weights_llama(config, out, dict(state), untie_weights="Gemma" in config.name)
    return out


def port(family: str, tie: bool = False) -> tuple[nn.Module, wp.TransferReport]:
    hf, state = _hf(family, tie)
    lit = lit_model(family, hf)
    report = wp.transfer(state, lit, mapping=MAPPING, strict=True)
    return lit, report


@pytest.mark.parametrize("family", FAMILIES)
def test_port_equals_litgpt_convert_hf_checkpoint_bit_for_bit(family: str) -> None:
    _, state = _hf(family)
    lit, _ = port(family)
    want = litgpt_from_hf(family, lit.config, state)
    got = lit.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # the same without a model: the mapping alone renames and fuses the state dict
    mapped = map_state_dict(state, wp.load_mapping(MAPPING))
    assert mapped.keys() == want.keys() - ({"lm_head.weight"} if family == "gemma" else set())
    assert all(torch.equal(t, want[name]) for name, t in mapped.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_ported_litgpt_model_gives_the_logits_of_transformers(family: str) -> None:
    hf, _ = _hf(family)
    lit, _ = port(family)
    ids = tokens()
    with torch.no_grad():
        diff = (lit(ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_to_transformers_is_bit_identical_and_equals_convert_lit_checkpoint(family: str) -> None:
    _, state = _hf(family)
    lit, _ = port(family)
    back = hf_model(family, seed=7)
    # Gemma's lm_head is its embedding matrix: litgpt's copy of it has no tensor of its own to go to (and
    # convert_lit_checkpoint leaves it out too)
    rules = [wp.drop("lm_head.weight")] if back.config.tie_word_embeddings else []
    wp.transfer(lit, back, mapping=wp.load_mapping(MAPPING).inverse(), rules=rules, strict=True)
    got = checkpoint_state(back)
    assert got.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
    theirs = hf_from_litgpt(family, lit.config, lit.state_dict())
    assert theirs.keys() == state.keys()
    for name, tensor in theirs.items():
        assert torch.equal(got[name], tensor), name


def test_grouped_query_qkv_is_q_then_k_then_v_with_uneven_parts() -> None:
    _, state = _hf("llama")
    lit, report = port("llama")
    qkv = lit.transformer.h[1].attn.qkv.weight
    assert qkv.shape == (4 * 16 + 2 * 2 * 16, 64)
    assert torch.equal(qkv[64:96], state["model.layers.1.self_attn.k_proj.weight"])
    assert report["transformer.h.1.attn.qkv.weight"].status == "loaded"


def test_verify_reads_a_spec_longer_than_a_file_name_as_an_architecture() -> None:
    from weightport.mapping.verify import pairs, verify

    source, target = next((s, t) for s, t in pairs(wp.load_mapping(MAPPING)) if "Mistral" in s)
    assert len(target) > 255  # longer than a file name may be: asking the file system raises ENAMETOOLONG
    assert verify(MAPPING, source=source, target=target, numerics=False).loaded == 17


def test_a_saved_transformers_folder_ports_into_litgpt(tmp_path) -> None:
    hf, state = _hf("qwen2")
    hf.save_pretrained(tmp_path)
    lit = lit_model("qwen2", hf)
    report = wp.transfer(tmp_path, lit, mapping=MAPPING, strict=True)
    assert report["transformer.h.0.attn.qkv.bias"].ops == ("fuse[3]",)
    want = litgpt_from_hf("qwen2", lit.config, state)
    assert all(torch.equal(lit.state_dict()[name], t) for name, t in want.items())


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_checkpoint_without_its_tied_lm_head_fills_it_from_the_embeddings(family: str) -> None:
    # Llama 3.2 1B, Qwen2.5 0.5B and every Gemma tie their head to the embeddings and save no lm_head
    hf, state = _hf(family, True)
    assert "lm_head.weight" not in state
    lit, report = port(family, True)
    entry = report["lm_head.weight"]
    assert entry.status == "loaded" and entry.sources == ("model.embed_tokens.weight",)
    assert "tie 'lm_head.weight' like 'transformer.wte.weight'" in (entry.rule or "")
    assert torch.equal(lit.lm_head.weight, state["model.embed_tokens.weight"])
    assert torch.equal(litgpt_from_hf(family, lit.config, state)["lm_head.weight"], lit.lm_head.weight)
    ids = tokens()
    with torch.no_grad():
        assert (lit(ids) - hf_logits(hf, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_ports_each_listed_pair_with_token_inputs_and_round_trips(family: str) -> None:
    from weightport.mapping.verify import pairs, verify

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma"}[family]
    source, target = next((s, t) for s, t in pairs(wp.load_mapping(MAPPING)) if s.startswith(f"transformers:{cls}"))
    result = verify(MAPPING, source=source, target=target)
    assert result.ok() and result.max_abs_diff is not None and result.max_abs_diff < 1e-5, result
    assert result.input.startswith("token ids")
    assert result.round_trip is True, result.round_trip_note


def test_map_state_dict_splits_uneven_parts_by_the_targets_it_is_given() -> None:
    # the inverse of litgpt's qkv fuse has no sizes: q, k and v of a multi-query model are 4, 1 and 1 heads
    rule = wp.fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}")
    state = {"q.w": torch.randn(4, 2), "k.w": torch.randn(1, 2), "v.w": torch.randn(1, 2)}
    fused = map_state_dict(state, wp.Mapping([rule]))
    back = map_state_dict(fused, wp.Mapping([rule.inverse()]), like=state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_map_state_dict_fuses_by_groups_as_planning_does() -> None:
    # per kv group: its q heads, its k head, its v head (torchtitan's wqkv, GPT-NeoX's query_key_value)
    mapping = wp.Mapping([wp.fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}", groups=2)])
    state = {"q.weight": torch.arange(4.0)[:, None], "k.weight": torch.tensor([[10.0], [11.0]])}
    state["v.weight"] = torch.tensor([[20.0], [21.0]])
    model = nn.Module()
    model.qkv = nn.Linear(1, 8, bias=False)
    wp.transfer(state, model, mapping=mapping, strict=True)
    fused = map_state_dict(state, mapping)["qkv.weight"]
    assert fused.flatten().tolist() == [0.0, 1.0, 10.0, 20.0, 2.0, 3.0, 11.0, 21.0]
    assert torch.equal(fused, model.qkv.weight.detach())
