"""``verify`` on language models: token ids in, logits compared (a tensor, an output object's ``logits``,
or only the last position's, as nanoGPT gives them), tied embeddings compared as the embedding they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.cli import main as cli
from weightport.errors import TargetError
from weightport.mapping._verify_models import outputs, vocabulary
from weightport.mapping.verify import pairs, verify

pytest.importorskip("transformers")

IDENTITY = wp.Mapping([], name="identity")
GPT2 = (
    "transformers:GPT2LMHeadModel(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, "
    "eos_token_id=0)"
)
LLAMA = (
    "transformers:LlamaForCausalLM(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, "
    "head_dim=16, intermediate_size=112, vocab_size=96, max_position_embeddings=128"
)


@pytest.mark.parametrize("name", ["hf.gpt2->nanogpt.gpt2", "hf.gpt2->weightport.gpt2"])
def test_the_gpt2_mappings_verify_on_token_ids(name: str) -> None:
    source, target = pairs(wp.load_mapping(name))[0]
    result = verify(name, source=source, target=target, input_size=(12,))
    assert result.ok(), result
    assert result.input == "token ids below 96, 12 long"
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    assert result.round_trip is True
    compared = {(m.source, m.target) for m in result.modules}
    assert (
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_fc" if "nanogpt" in name else "blocks.1.mlp.fc1",
    ) in compared
    # the token embedding is compared as an embedding, though GPT-2's lm_head shares its tensor
    assert ("transformer.wte", "transformer.wte" if "nanogpt" in name else "embed.tokens") in compared


def test_a_wrong_gpt2_mapping_fails_at_the_module_that_takes_the_wrong_tensor() -> None:
    m = wp.load_mapping("hf.gpt2->weightport.gpt2")
    swapped = wp.Mapping(
        [wp.rename("h.{i}.ln_1.{p}", "blocks.{i}.norm2.{p}"), wp.rename("h.{i}.ln_2.{p}", "blocks.{i}.norm1.{p}"), *m],
        name="swapped",
        source_prefix="transformer.",
    )
    source, target = pairs(m)[0]
    result = verify(swapped, source=source, target=target)
    assert not result.ok()
    assert result.first_divergence is not None and result.first_divergence.source == "transformer.h.0.ln_1"


def test_nanogpt_gives_the_last_positions_logits_and_those_are_compared() -> None:
    every = torch.randn(2, 7, 11)
    a, b = outputs(type("Out", (), {"logits": every})(), (every[:, [-1], :], None))
    assert torch.equal(a, every[:, -1:]) and torch.equal(b, every[:, -1:])
    with pytest.raises(wp.errors.OpError, match="differ in shape"):
        outputs(every, torch.randn(2, 7, 12))


@pytest.mark.parametrize("tie", [False, True])
def test_hf_llama_verifies_through_an_identity_mapping(tie: bool) -> None:
    spec = f"{LLAMA}, tie_word_embeddings={tie})"
    result = verify(IDENTITY, source=spec, target=spec)
    assert result.ok() and result.max_abs_diff == 0 and result.round_trip is True
    assert result.input == "token ids below 96, 16 long"
    compared = {m.source for m in result.modules}
    assert {"model.embed_tokens", "model.layers.1.self_attn.k_proj", "model.norm"} <= compared


def test_hf_gpt2_verifies_through_an_identity_mapping() -> None:
    result = verify(IDENTITY, source=GPT2, target=GPT2)
    assert result.ok() and result.max_abs_diff == 0 and result.round_trip is True
    assert "transformer.wte" in {m.source for m in result.modules}


class HeadFirstLM(nn.Module):
    """Registers its output head before its embedding, as litgpt's GPT does."""

    def __init__(self, vocab: int = 40, dim: int = 8) -> None:
        super().__init__()
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte = nn.Embedding(vocab, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.wte(idx))


def test_a_model_whose_head_comes_first_still_takes_token_ids() -> None:
    assert vocabulary(HeadFirstLM()) == 40
    assert vocabulary(nn.Sequential(nn.Linear(4, 40), nn.Embedding(30, 4))) is None  # a head onto no vocabulary
    result = verify(IDENTITY, source="test_verify_tokens:HeadFirstLM", target="test_verify_tokens:HeadFirstLM")
    assert result.ok() and result.input == "token ids below 40, 16 long"


def test_a_model_that_fails_on_the_input_is_named_with_the_input() -> None:
    with pytest.raises(TargetError, match=r"the source model \(TinyNet\) fails on the input \(2, 5\) int64.*--input"):
        verify(
            IDENTITY, source="conftest:TinyNet", target="conftest:TinyNet", input=torch.zeros(2, 5, dtype=torch.long)
        )


@pytest.mark.slow
def test_litgpt_verifies_on_token_ids() -> None:
    pytest.importorskip("litgpt")
    spec = "litgpt.model:GPT.from_name('pythia-14m', n_layer=2)"
    result = verify(IDENTITY, source=spec, target=spec, input_size=(8,))
    assert result.ok() and result.input.startswith("token ids below") and result.round_trip is True


def test_the_cli_verifies_the_nanogpt_pair_on_token_ids(capsys: pytest.CaptureFixture[str]) -> None:
    source, target = pairs(wp.load_mapping("hf.gpt2->nanogpt.gpt2"))[0]
    assert cli(["verify", "hf.gpt2->nanogpt.gpt2", "--source", source, "--target", target, "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and "round trip exact" in out and "input: token ids below 96, 16 long" in out
    assert cli(["verify", "hf.gpt2->nanogpt.gpt2", "--source", source, "--target", target, "--input-size", "8,8"]) == 2
    assert "sequence length" in capsys.readouterr().err


# -- model facts ($heads …) in the mapping: the port and the round trip both bind them --------------------


def _reshape_through(*shape: object) -> list[tuple[str, dict[str, object]]]:
    """A chain that changes nothing but names facts: reshape to ``shape``, then back to 2-d."""
    return [("reshape", {"shape": list(shape)}), ("reshape", {"shape": ["$kv_heads * $head_dim", "$hidden"]})]


def test_a_mapping_that_names_model_facts_is_round_tripped_with_them() -> None:
    spec = f"{LLAMA}, tie_word_embeddings=False)"
    k_proj = "model.layers.{i}.self_attn.k_proj.weight"
    m = wp.Mapping([wp.rename(k_proj, k_proj, ops=_reshape_through("$kv_heads", "$head_dim", "$hidden"))], name="f")
    result = verify(m, source=spec, target=spec)
    assert result.ok() and result.max_abs_diff == 0
    assert result.round_trip is True and result.round_trip_note is None
    assert result.facts == {"head_dim": 16, "hidden": 64, "kv_heads": 2}


class Heads(nn.Module):
    """A tiny token model; with ``heads``, its attention states its head count as torchtune's modules do."""

    def __init__(self, heads: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.attn = nn.Linear(4, 4)
        if heads:
            self.attn.num_heads = heads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.attn(self.embed(ids))


def two_heads() -> Heads:
    return Heads(2)


def test_facts_come_from_the_option_else_the_target_else_the_source_model(capsys: pytest.CaptureFixture[str]) -> None:
    ops = [("reshape", {"shape": ["$heads", -1]}), ("reshape", {"shape": [4, 4]})]
    m = wp.Mapping([wp.rename("attn.weight", "attn.weight", ops=ops)], name="heads")
    here = "test_verify_tokens"
    result = verify(m, source=f"{here}:two_heads", target=f"{here}:Heads")
    assert result.ok() and result.round_trip is True and result.facts == {"heads": 2}
    with pytest.raises(wp.errors.MappingError, match=r"needs model fact\(s\) 'heads'.*facts="):
        verify(m, source=f"{here}:Heads", target=f"{here}:Heads")
    result = verify(m, source=f"{here}:Heads", target=f"{here}:Heads", facts={"heads": 4})
    assert result.ok() and result.round_trip is True and result.facts == {"heads": 4}
    assert verify(m, source=f"{here}:Heads", target=f"{here}:Heads", numerics=False, facts={"heads": 1}).ok()

    from weightport._cli_verify import lines

    assert "       model facts: heads=4" in lines(result, verbose=True)


def test_the_cli_takes_facts_for_verify(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "heads.toml"
    path.write_text(
        'name = "heads"\nsource = "test_verify_tokens:Heads"\ntarget = "test_verify_tokens:Heads"\n'
        '[[rule]]\nrename = "attn.weight"\nto = "attn.weight"\n'
        'ops = [{op = "reshape", shape = ["$heads", -1]}, {op = "reshape", shape = [4, 4]}]\n'
    )
    assert cli(["verify", str(path), "--fact", "heads=2", "-v"]) == 0
    assert "model facts: heads=2" in capsys.readouterr().out
    assert cli(["verify", str(path)]) == 2
    assert "--fact heads=N" in capsys.readouterr().err
    assert cli(["verify", str(path), "--fact", "heads"]) == 2
    assert "expected NAME=N" in capsys.readouterr().err


# -- rotary layouts: q and k come out in another order, the model's output does not -------------------------

_HF_TO_TUNE = [
    wp.rename("model.embed_tokens.weight", "tok_embeddings.weight"),
    *(
        wp.rename(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"layers.{{i}}.attn.{p}_proj.weight", ops=[op])
        for p, op in (
            ("q", ("rope_permute", {"heads": "$heads", "to": "interleaved"})),
            ("k", ("rope_permute", {"heads": "$kv_heads", "to": "interleaved"})),
        )
    ),
    wp.rename("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.weight"),
    wp.rename("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.output_proj.weight"),
    wp.rename("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.w1.weight"),
    wp.rename("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.w3.weight"),
    wp.rename("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.w2.weight"),
    wp.rename("model.layers.{i}.input_layernorm.weight", "layers.{i}.sa_norm.scale"),
    wp.rename("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale"),
    wp.rename("model.norm.weight", "norm.scale"),
    wp.rename("lm_head.weight", "output.weight"),
]


def test_modules_whose_outputs_a_rotary_permutation_reorders_are_not_compared() -> None:
    from weightport.mapping._activations import corresponding

    m = wp.Mapping(_HF_TO_TUNE, name="hf->tune")
    names = {k: k for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight")}
    qv = lambda: nn.ModuleDict({"q_proj": nn.Linear(2, 2), "v_proj": nn.Linear(2, 2)})  # noqa: E731
    source = nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"self_attn": qv()})])})})
    target = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"attn": qv()})])})
    assert corresponding(m, names, source, target) == [("model.layers.0.self_attn.v_proj", "layers.0.attn.v_proj")]


@pytest.mark.slow
def test_hf_llama_verifies_into_torchtune_with_rotary_permutations() -> None:
    pytest.importorskip("torchtune")
    tune = (
        "torchtune.models.llama3:llama3(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, "
        "max_seq_len=128, intermediate_dim=112, rope_base=10000)"
    )
    # kv_heads given: torchtune's decoder states num_heads and head_dim at its top, num_kv_heads only in attention
    result = verify(wp.Mapping(_HF_TO_TUNE, name="hf->tune"), source=f"{LLAMA})", target=tune, facts={"kv_heads": 2})
    assert result.ok(), result
    assert result.round_trip is True and result.facts == {"heads": 4, "kv_heads": 2}
    assert result.cause == "LlamaRMSNorm eps 1e-06 (source) vs 1e-05 (target) on 5 modules"
    assert result.explained_diff is not None and result.explained_diff < 1e-5
    compared = {m.source for m in result.modules}
    assert "model.layers.0.self_attn.v_proj" in compared and "model.layers.0.self_attn.q_proj" not in compared


# -- grouped-query layouts in the round trip -------------------------------------------------------------

_QKV = ["q.{p}", "k.{p}", "v.{p}"]


def _parts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{p}.weight": torch.randn(8, 4, generator=g) for p in "qkv"}


@pytest.mark.parametrize("groups", [1, 2])
def test_map_state_dict_fuses_and_splits_by_groups_as_planning_does(groups: int) -> None:
    from weightport.mapping.verify import map_state_dict

    parts = _parts()
    fuse = wp.Mapping([wp.fuse(_QKV, "qkv.{p}", groups=groups)], name="fuse")
    model = nn.Module()
    model.qkv = nn.Linear(4, 24, bias=False)
    wp.transfer(parts, model, mapping=fuse, strict=True)
    fused = map_state_dict(parts, fuse)
    assert torch.equal(fused["qkv.weight"], model.qkv.weight.detach())  # groups=2: q0 k0 v0 q1 k1 v1
    back = map_state_dict(fused, fuse.inverse())
    assert back.keys() == parts.keys() and all(torch.equal(back[k], v) for k, v in parts.items())


@pytest.mark.parametrize("name", ["hf.gpt2->nanogpt.gpt2", "hf.gpt2->weightport.gpt2"])
def test_names_and_shapes_of_a_tied_model_built_on_meta_count_its_shared_tensor_once(name: str) -> None:
    from weightport.mapping._verify_models import build_light, meta_state

    source, target = pairs(wp.load_mapping(name))[0]
    assert verify(name, source=source, target=target, numerics=False).ok()
    names = meta_state(build_light(source, shapes_only=True))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    kept, tied = (
        ("transformer.wte.weight", "lm_head.weight") if "nanogpt" in name else ("embed.tokens.weight", "head.weight")
    )
    back = meta_state(build_light(target, shapes_only=True))  # state_dict names, the tied tensor once
    assert kept in back and tied not in back


class _ScaledEmbedding(nn.Embedding):
    """An embedding that scales its lookup (Gemma's), where other codebases scale after the embedding."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 8.0


def test_an_embedding_that_scales_is_not_compared_with_a_plain_one() -> None:
    from weightport.mapping._activations import corresponding

    m = wp.Mapping([wp.rename("embed.weight", "wte.weight"), wp.rename("norm.{p}", "ln.{p}")], name="scaled")
    names = {"embed.weight": "embed.weight", "norm.weight": "norm.weight"}
    scaled = nn.ModuleDict({"embed": _ScaledEmbedding(10, 4), "norm": nn.LayerNorm(4)})
    plain = nn.ModuleDict({"wte": nn.Embedding(10, 4), "ln": nn.LayerNorm(4)})
    assert corresponding(m, names, scaled, plain) == [("norm", "ln")]
    both = nn.ModuleDict({"wte": _ScaledEmbedding(10, 4), "ln": nn.LayerNorm(4)})
    assert corresponding(m, names, scaled, both) == [("embed", "wte"), ("norm", "ln")]
