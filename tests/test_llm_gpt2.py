"""The shipped GPT-2 mappings, each checked three ways on a tiny GPT-2 whose every parameter is random:
the state dict weightport writes equals, bit for bit, what the other project's own conversion writes
(nanoGPT's ``GPT.from_pretrained``); the logits equal the transformers model's in eval mode; and the
round trip back gives every Hugging Face tensor back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nanogpt_model import GPT, GPTConfig
from torch import nn

import weightport as wp
from weightport.mapping.verify import map_state_dict
from weightport.models import GPT2, GPT2Config

transformers = pytest.importorskip("transformers")

NANOGPT = "hf.gpt2->nanogpt.gpt2"
QKV = "hf.gpt2->weightport.gpt2"
SIZES = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=64)


def hf_gpt2(seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny ``GPT2LMHeadModel`` in eval mode with every parameter random (LayerNorm weights near 1)."""
    config = transformers.GPT2Config(**SIZES, bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.1 * noise)
    return model.eval()


def nanogpt() -> GPT:
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=96, block_size=64)).eval()


def qkv_gpt2(**overrides: object) -> GPT2:
    return GPT2(layers=2, hidden=64, heads=4, vocab_size=96, max_positions=64, **overrides).eval()


def nanogpt_from_pretrained(sd_hf: dict[str, torch.Tensor]) -> GPT:
    """nanoGPT's ``GPT.from_pretrained`` after it has loaded the Hugging Face model: its own loop, as written there."""
    model = nanogpt()
    sd = model.state_dict()
    sd_keys = [k for k in sd if not k.endswith(".attn.bias")]  # discard this mask / buffer, not a param
    sd_keys_hf = [k for k in sd_hf if not k.endswith(".attn.masked_bias")]  # ignore these, just a buffer
    sd_keys_hf = [k for k in sd_keys_hf if not k.endswith(".attn.bias")]  # same, just the mask (buffer)
    transposed = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    # the openai checkpoints use a "Conv1D" module, but we only want to use a vanilla Linear
    assert len(sd_keys_hf) == len(sd_keys), f"mismatched keys: {len(sd_keys_hf)} != {len(sd_keys)}"
    for k in sd_keys_hf:
        if any(k.endswith(w) for w in transposed):
            assert sd_hf[k].shape[::-1] == sd[k].shape
            with torch.no_grad():
                sd[k].copy_(sd_hf[k].t())
        else:
            assert sd_hf[k].shape == sd[k].shape
            with torch.no_grad():
                sd[k].copy_(sd_hf[k])
    return model


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of the hub's gpt2 files: no ``transformer.`` prefix, no ``lm_head``, the causal-mask buffers."""
    out = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    n = SIZES["n_positions"]
    for i in range(SIZES["n_layer"]):
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids) if isinstance(model, transformers.PreTrainedModel) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def ids(batch: int = 3, length: int = 20) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


def equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- nanoGPT -------------------------------------------------------------------------------------------


def test_nanogpt_state_dict_equals_nanogpts_from_pretrained_bit_for_bit() -> None:
    sd_hf = hf_gpt2().state_dict()
    ours = nanogpt()
    report = wp.transfer(sd_hf, ours, mapping=NANOGPT, strict=True)
    equal_states(ours.state_dict(), nanogpt_from_pretrained(sd_hf).state_dict())
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied
    assert report["transformer.h.1.attn.c_attn.weight"].ops == ("transpose(0,1)",)
    assert report["transformer.h.1.attn.c_attn.bias"].ops == ()


def test_nanogpt_from_the_hub_layout_and_from_a_save_pretrained_folder(tmp_path: Path) -> None:
    hf = hf_gpt2()
    want = nanogpt_from_pretrained(hf.state_dict()).state_dict()
    from_hub = nanogpt()
    report = wp.transfer(hub_layout(hf.state_dict()), from_hub, mapping=NANOGPT, strict=True)
    equal_states(from_hub.state_dict(), want)
    assert {"h.0.attn.bias", "h.1.attn.masked_bias"} <= set(report.dropped)
    hf.save_pretrained(tmp_path)  # transformers writes no lm_head: it is tied
    from_folder = nanogpt()
    wp.transfer(tmp_path, from_folder, mapping=NANOGPT, strict=True)
    equal_states(from_folder.state_dict(), want)


def test_nanogpt_logits_match_transformers() -> None:
    # nanoGPT's GELU is exact: against GPT-2 with exact GELU the logits agree everywhere
    hf, x = hf_gpt2(activation_function="gelu"), ids()
    nano = nanogpt()
    wp.transfer(hf.state_dict(), nano, mapping=NANOGPT, strict=True)
    want = logits(hf, x)
    with torch.no_grad():
        every, _loss = nano(x, targets=x)
        last, no_loss = nano(x)
    assert no_loss is None and last.shape == (3, 1, 96)
    assert (every - want).abs().max() < 1e-5
    assert (last - want[:, -1:]).abs().max() < 1e-5


def test_nanogpt_differs_from_gpt2s_tanh_gelu_only_by_the_activation() -> None:
    hf, x = hf_gpt2(), ids()  # activation_function="gelu_new", GPT-2's own
    nano = nanogpt()
    wp.transfer(hf.state_dict(), nano, mapping=NANOGPT, strict=True)
    want = logits(hf, x)
    with torch.no_grad():
        exact = nano(x, targets=x)[0]
        for block in nano.transformer.h:
            block.mlp.gelu = nn.GELU(approximate="tanh")
        tanh = nano(x, targets=x)[0]
    assert (exact - want).abs().max() > 1e-4
    assert (tanh - want).abs().max() < 1e-5


def test_nanogpt_round_trip_is_bit_identical() -> None:
    hf = hf_gpt2()
    nano = nanogpt()
    wp.transfer(hf.state_dict(), nano, mapping=NANOGPT, strict=True)
    back = map_state_dict(nano.state_dict(), wp.load_mapping(NANOGPT).inverse())
    # the inverse writes the hub's names (no 'transformer.' prefix), which transformers loads as well
    equal_states(back, {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()})


def test_an_untied_lm_head_is_refused_not_dropped() -> None:
    state = dict(hf_gpt2().state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    for name, model in ((NANOGPT, nanogpt()), (QKV, qkv_gpt2())):
        with pytest.raises(wp.errors.StrictnessError, match="lm_head.weight"):
            wp.transfer(state, model, mapping=name, strict=True)


# -- separate q, k, v ----------------------------------------------------------------------------------


def test_qkv_state_dict_splits_c_attn_then_transposes_each_part() -> None:
    sd_hf = hf_gpt2().state_dict()
    ours = qkv_gpt2()
    report = wp.transfer(sd_hf, ours, mapping=QKV, strict=True)
    got = ours.state_dict()
    for i in range(2):
        h = f"transformer.h.{i}."
        c_attn, c_bias = sd_hf[h + "attn.c_attn.weight"], sd_hf[h + "attn.c_attn.bias"]
        for n, part in enumerate("qkv"):
            assert torch.equal(got[f"blocks.{i}.attn.{part}.weight"], c_attn[:, n * 64 : (n + 1) * 64].T)
            assert torch.equal(got[f"blocks.{i}.attn.{part}.bias"], c_bias[n * 64 : (n + 1) * 64])
        assert torch.equal(got[f"blocks.{i}.attn.proj.weight"], sd_hf[h + "attn.c_proj.weight"].T)
        assert torch.equal(got[f"blocks.{i}.mlp.fc1.weight"], sd_hf[h + "mlp.c_fc.weight"].T)
        assert torch.equal(got[f"blocks.{i}.mlp.fc2.weight"], sd_hf[h + "mlp.c_proj.weight"].T)
    assert torch.equal(got["embed.tokens.weight"], sd_hf["transformer.wte.weight"])
    assert ours.head.weight is ours.embed.tokens.weight
    assert report["blocks.0.attn.k.weight"].ops == ("split[2/3]", "transpose(0,1)")


def test_qkv_logits_match_transformers_and_the_round_trip_is_bit_identical() -> None:
    hf, x = hf_gpt2(), ids()
    ours = qkv_gpt2()
    wp.transfer(hub_layout(hf.state_dict()), ours, mapping=QKV, strict=True)
    assert (logits(ours, x) - logits(hf, x)).abs().max() < 1e-5
    back = map_state_dict(ours.state_dict(), wp.load_mapping(QKV).inverse())
    equal_states(back, {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()})


def test_qkv_with_exact_gelu_matches_transformers_with_exact_gelu() -> None:
    hf, x = hf_gpt2(activation_function="gelu"), ids()
    ours = GPT2(GPT2Config.from_hf(hf.config.to_dict()))
    assert ours.cfg.activation == "gelu" and ours.cfg.layers == 2
    wp.transfer(hf.state_dict(), ours.eval(), mapping=QKV, strict=True)
    assert (logits(ours, x) - logits(hf, x)).abs().max() < 1e-5


def test_the_inverse_written_file_loads_into_transformers_bit_for_bit(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf = hf_gpt2()
    ours = qkv_gpt2()
    wp.transfer(hf.state_dict(), ours, mapping=QKV, strict=True)
    back = map_state_dict(ours.state_dict(), wp.load_mapping(QKV).inverse())
    back.pop("lm_head.weight")  # one tensor per storage in a file: the head is the embedding
    save_file({k: v.contiguous() for k, v in back.items()}, str(tmp_path / "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    equal_states(again.state_dict(), hf.state_dict())


# -- weightport.models.GPT2 itself ---------------------------------------------------------------------


def test_gpt2_config_reads_a_transformers_config_and_refuses_what_gpt2_lacks(tmp_path: Path) -> None:
    hf_gpt2().config.save_pretrained(tmp_path)
    cfg = GPT2Config.from_hf(tmp_path)
    assert (cfg.vocab_size, cfg.max_positions, cfg.hidden, cfg.layers, cfg.heads) == (96, 64, 64, 2, 4)
    assert cfg.activation == "gelu_new" and cfg.mlp is None
    with pytest.raises(wp.errors.SourceError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_hf({"scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(wp.errors.SourceError, match="activation_function"):
        GPT2Config.from_hf({"activation_function": "relu"})
    with pytest.raises(TypeError, match="no field"):
        GPT2(depth=2)
    with pytest.raises(ValueError, match="divisible"):
        GPT2(hidden=60, heads=8)
    with pytest.raises(ValueError, match="max_positions"):
        qkv_gpt2()(torch.zeros(1, 65, dtype=torch.long))
