"""The rotary and grouped-query ops: ``rope_permute`` against the reference converters' formula and
against rotary attention itself, ``gqa_split`` against an explicit fused layout."""

from __future__ import annotations

import pytest
import torch

from weightport.mapping.ops import OpCall

HEADS, KV_HEADS, HEAD_DIM, DIM = 4, 2, 8, 32


def _op(name: str, **params) -> OpCall:
    return OpCall.make(name, params, "test")


def _meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``permute`` of transformers' ``convert_llama_weights_to_hf.py`` (= torchtune's ``tune_to_hf``
    ``_permute``): Meta's interleaved rows to Hugging Face's rotate-half rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """torchtune's ``hf_to_tune`` ``_permute``: rotate-half rows to interleaved rows."""
    dim1, dim2 = w.shape
    head_dim = dim1 // n_heads
    return w.view(n_heads, 2, head_dim // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize(("proj", "heads"), [("q", HEADS), ("k", KV_HEADS)])
def test_rope_permute_equals_the_reference_converters_bit_for_bit(proj, heads):
    torch.manual_seed(0)
    w_hf = torch.randn(heads * HEAD_DIM, DIM)
    to_meta = _op("rope_permute", heads=heads, head_dim=HEAD_DIM)
    w_meta = to_meta.run(w_hf)
    assert torch.equal(w_meta, _hf_to_meta(w_hf, heads))
    back = to_meta.inverse()
    assert back is not None
    assert torch.equal(back.run(w_meta), _meta_to_hf(w_meta, heads))
    assert torch.equal(back.run(w_meta), w_hf)  # the round trip is bit-identical
    bias = torch.randn(heads * HEAD_DIM)  # Qwen2-style q/k biases move with their rows
    assert torch.equal(to_meta.run(bias), _hf_to_meta(bias[:, None], heads)[:, 0])
    assert torch.equal(back.run(to_meta.run(bias)), bias)


def _rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face rotary: channel i pairs with i + head_dim/2 (``rotate_half``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * torch.cat([cos, cos], -1) + torch.cat([-x2, x1], -1) * torch.cat([sin, sin], -1)


def _rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta / torchtune / torchtitan rotary: channels 2i and 2i+1 pair (a complex number)."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def test_hf_rotary_on_hf_weights_equals_interleaved_rotary_on_permuted_weights():
    """Attention scores are the same in both codebases: q.k after rotary, per head, under GQA."""
    torch.manual_seed(0)
    seq = 5
    wq, wk = torch.randn(HEADS * HEAD_DIM, DIM, dtype=torch.float64), torch.randn(KV_HEADS * HEAD_DIM, DIM).double()
    x = torch.randn(seq, DIM, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs  # (seq, head_dim/2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # broadcast over heads

    def scores(wq: torch.Tensor, wk: torch.Tensor, rotary) -> torch.Tensor:
        q = rotary((x @ wq.T).view(seq, HEADS, HEAD_DIM), cos, sin)
        k = rotary((x @ wk.T).view(seq, KV_HEADS, HEAD_DIM), cos, sin)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        return torch.einsum("qhd,khd->hqk", q, k)

    wq_i = _op("rope_permute", heads=HEADS).run(wq)
    wk_i = _op("rope_permute", heads=KV_HEADS).run(wk)
    hf = scores(wq, wk, _rotary_half)
    torch.testing.assert_close(scores(wq_i, wk_i, _rotary_interleaved), hf)
    # without the permutation the scores differ: the op is what makes the port correct
    assert not torch.allclose(scores(wq, wk, _rotary_interleaved), hf)


def test_hf_rotary_matches_transformers_own_apply_rotary_pos_emb():
    """The rotate-half reference above is transformers' Llama rotary."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    q, k = torch.randn(1, HEADS, 3, HEAD_DIM), torch.randn(1, KV_HEADS, 3, HEAD_DIM)
    angles = torch.randn(1, 3, HEAD_DIM // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    torch.testing.assert_close(q_hf, _rotary_half(q, c, s))
    torch.testing.assert_close(k_hf, _rotary_half(k, c, s))


def test_gqa_split_takes_each_part_of_a_fused_per_group_qkv():
    torch.manual_seed(0)
    dim = DIM
    q, k, v = (torch.randn(h * HEAD_DIM, dim) for h in (HEADS, KV_HEADS, KV_HEADS))
    per_kv = HEADS // KV_HEADS
    groups = []  # explicit construction: for each kv group, its q heads, its k head, its v head
    for g in range(KV_HEADS):
        groups.append(q[g * per_kv * HEAD_DIM : (g + 1) * per_kv * HEAD_DIM])
        groups.append(k[g * HEAD_DIM : (g + 1) * HEAD_DIM])
        groups.append(v[g * HEAD_DIM : (g + 1) * HEAD_DIM])
    fused = torch.cat(groups)
    for part, want in zip("qkv", (q, k, v)):
        call = _op("gqa_split", heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, part=part)
        assert torch.equal(call.run(fused), want)
        assert call.run(fused[:, 0]).equal(want[:, 0])  # a fused bias splits the same way
        assert call.run(fused.to("meta")).shape == want.shape
    # MQA (one kv head) and MHA (GPT-NeoX: q, k, v per head) are the two ends
    mqa = torch.cat([q, k[:HEAD_DIM], v[:HEAD_DIM]])
    assert torch.equal(_op("gqa_split", heads=HEADS, kv_heads=1, head_dim=HEAD_DIM, part="k").run(mqa), k[:HEAD_DIM])
    neox = torch.arange(6.0)[:, None]  # 2 heads of head_dim 1: q0 k0 v0 q1 k1 v1
    got = [_op("gqa_split", heads=2, kv_heads=2, head_dim=1, part=p).run(neox)[:, 0].tolist() for p in "qkv"]
    assert got == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]


def test_rope_permute_in_a_mapping_loads_exactly_and_inverts():
    import weightport as wp

    torch.manual_seed(0)
    hf = {"q_proj.weight": torch.randn(HEADS * HEAD_DIM, DIM), "k_proj.weight": torch.randn(KV_HEADS * HEAD_DIM, DIM)}
    mapping = wp.Mapping(
        [
            wp.transform("q_proj.weight", "wq.weight", "rope_permute", heads=HEADS),
            wp.transform("k_proj.weight", "wk.weight", "rope_permute", heads=KV_HEADS),
        ]
    )
    target = torch.nn.Module()
    target.wq = torch.nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
    target.wk = torch.nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
    report = wp.transfer(hf, target, mapping=mapping, strict=True)
    assert {e.status for e in report.entries} == {"loaded"}
    assert torch.equal(target.wq.weight, _hf_to_meta(hf["q_proj.weight"], HEADS))
    back = mapping.inverse()
    assert [r.ops[0].params["to"] for r in back.rules] == ["half", "half"]
    source = torch.nn.Module()
    source.q_proj = torch.nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
    source.k_proj = torch.nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
    wp.transfer(target.state_dict(), source, mapping=back, strict=True)
    assert torch.equal(source.q_proj.weight, hf["q_proj.weight"]) and torch.equal(
        source.k_proj.weight, hf["k_proj.weight"]
    )
