"""The shipped Hugging Face <-> torchtune mappings, checked three ways on tiny random models.

``hf.llama->torchtune.llama`` (Llama 3, Mistral, Gemma: torchtune rotates adjacent pairs, so q and
k are permuted) and ``hf.qwen2->torchtune.qwen2`` (torchtune's Qwen2 rotates halves as Hugging Face
does: names only). For every family: (a) the ported state dict equals, bit for bit, what torchtune's
own converter (``convert_weights.hf_to_tune``, ``qwen2_hf_to_tune``) makes of the same Hugging Face
state dict; (b) the torchtune model's logits equal the transformers model's in eval mode; (c) the
inverse mapping brings the weights back bit-identical, equal to torchtune's ``tune_to_hf``. The head
counts are never given: they come from the target model (torchtune's ``num_heads``/``num_kv_heads``
attributes, a transformers config) or the source folder's ``config.json``.

torchtune 0.6 has no Qwen3 model, so Qwen3 has no torchtune mapping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_models import FAMILIES, HEAD_DIM, HIDDEN, VOCAB, hf_logits, hf_model, tokens
from torch import nn

import weightport as wp
from weightport.mapping.verify import pairs, verify

pytest.importorskip("torchtune")
transformers = pytest.importorskip("transformers")

from torchtune.models import convert_weights  # noqa: E402
from torchtune.models.qwen2 import _convert_weights as qwen2_convert  # noqa: E402

TUNE_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
ATOL = 1e-5


def mapping_name(family: str) -> str:
    return "hf.qwen2->torchtune.qwen2" if family == "qwen2" else "hf.llama->torchtune.llama"


def tune_model(hf: nn.Module, *, tie: bool | None = None) -> nn.Module:
    """torchtune's own builder for ``hf``'s family and sizes (rope base and norm eps matched), eval mode.
    ``tie`` overrides the tying of the output to the embeddings where the builder has the choice."""
    from torchtune.models.gemma import gemma
    from torchtune.models.llama3 import llama3
    from torchtune.models.mistral import mistral
    from torchtune.models.qwen2 import qwen2

    c = hf.config
    sizes = dict(
        vocab_size=c.vocab_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        embed_dim=c.hidden_size,
        intermediate_dim=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        norm_eps=c.rms_norm_eps,
        rope_base=c.rope_parameters["rope_theta"],
    )
    family = c.model_type
    torch.manual_seed(1)  # weights unlike the source's, so a tensor left unloaded shows
    if family == "llama":
        model = llama3(**sizes)
    elif family == "mistral":
        model = mistral(**sizes)
    elif family == "qwen2":
        model = qwen2(**sizes, tie_word_embeddings=c.tie_word_embeddings if tie is None else tie)
    elif family == "gemma":
        model = gemma(**sizes, head_dim=c.head_dim)
    else:
        raise ValueError(f"torchtune 0.6 has no builder for {family!r}")
    return model.eval()


def hf_state(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes: without ``lm_head.weight`` when it is tied."""
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def torchtunes_converter(hf: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c = hf.config
    sizes = dict(
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, dim=c.hidden_size, head_dim=c.head_dim
    )
    if c.model_type == "qwen2":
        return qwen2_convert.qwen2_hf_to_tune(state, **sizes, tie_word_embeddings=c.tie_word_embeddings)
    return convert_weights.hf_to_tune(state, **sizes)


def torchtunes_inverse(hf: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c = hf.config
    sizes = dict(
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, dim=c.hidden_size, head_dim=c.head_dim
    )
    if c.model_type == "qwen2":
        return qwen2_convert.qwen2_tune_to_hf(state, **sizes)
    return convert_weights.tune_to_hf(state, **sizes)


def tune_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in got if not torch.equal(got[k], want[k])]
    assert not differ, f"not bit-identical: {differ}"


@pytest.mark.parametrize("family", TUNE_FAMILIES)
def test_ported_state_dict_equals_torchtunes_own_converter(family):
    hf = hf_model(family)
    model = tune_model(hf)
    state = hf_state(hf)
    wp.transfer(state, model, mapping=mapping_name(family), strict=True)
    want = torchtunes_converter(hf, state)
    got = model.state_dict()
    assert_same_tensors(got, {k: want[k] for k in got})


@pytest.mark.parametrize("family", TUNE_FAMILIES)
def test_torchtune_logits_equal_transformers_logits(family):
    hf = hf_model(family)
    model = tune_model(hf)
    wp.transfer(hf_state(hf), model, mapping=mapping_name(family), strict=True)
    ids = tokens()
    diff = (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff < ATOL


@pytest.mark.parametrize("family", TUNE_FAMILIES)
def test_round_trip_back_to_transformers_is_bit_identical_and_equals_tune_to_hf(family):
    hf = hf_model(family)
    model = tune_model(hf)
    mapping = wp.load_mapping(mapping_name(family))
    wp.transfer(hf_state(hf), model, mapping=mapping, strict=True)
    back = hf_model(family, seed=1)
    wp.transfer(model, back, mapping=mapping.inverse(), strict=True)
    assert_same_tensors(hf_state(back), hf_state(hf))
    theirs = torchtunes_inverse(hf, model.state_dict())
    assert_same_tensors(theirs, hf_state(hf))


def test_a_family_on_the_wrong_mapping_gives_other_logits():
    # Qwen2 through the Llama mapping gets Llama's rotary permutation (and loses its biases):
    # the names line up, the numbers do not. The two files differ for a reason.
    hf = hf_model("qwen2")
    model = tune_model(hf)
    report = wp.transfer(hf_state(hf), model, mapping="hf.llama->torchtune.llama", strict=False)
    assert "model.layers.0.self_attn.q_proj.bias" in report.unused
    ids = tokens()
    assert (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", TUNE_FAMILIES)
def test_a_saved_transformers_folder_ports_with_head_counts_from_its_config(family, tmp_path: Path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    model = tune_model(hf)
    report = wp.transfer(tmp_path, model, mapping=mapping_name(family), strict=True)
    assert report.coverage == 1.0
    ids = tokens()
    assert (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_a_tied_checkpoint_fills_an_untied_torchtune_output_from_the_embeddings(tmp_path: Path):
    hf = hf_model("llama", tie=True)
    hf.save_pretrained(tmp_path)
    model = tune_model(hf)  # llama3 always has its own output projection
    report = wp.transfer(tmp_path, model, mapping="hf.llama->torchtune.llama", strict=True)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)
    assert torch.equal(model.output.weight, hf.model.embed_tokens.weight)
    entry = report["output.weight"]
    assert entry.sources == ("model.embed_tokens.weight",) and "like 'tok_embeddings.weight'" in str(entry.rule)
    ids = tokens()
    assert (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_a_tied_llama_3_2_ports_into_torchtunes_llama3_2_with_its_scaled_rope():
    from torchtune.models.llama3_2 import llama3_2

    rope = {  # Llama 3.2's rope scaling, which torchtune's llama3_2 builds in (scale_factor=32)
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = hf_model("llama", tie=True, rope_parameters=rope, max_position_embeddings=8192)
    c = hf.config
    model = llama3_2(
        vocab_size=c.vocab_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        embed_dim=c.hidden_size,
        intermediate_dim=c.intermediate_size,
        max_seq_len=128,
    ).eval()
    assert "output.weight" not in model.state_dict()  # tied: the output is the embeddings
    state = hf_state(hf)
    wp.transfer(state, model, mapping="hf.llama->torchtune.llama", strict=True)
    assert_same_tensors(model.state_dict(), torchtunes_converter(hf, state))
    ids = tokens()
    assert (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_a_tied_qwen2_ports_into_torchtunes_tied_qwen2_and_back():
    hf = hf_model("qwen2", tie=True)
    model = tune_model(hf)
    assert "output.weight" not in model.state_dict()
    wp.transfer(hf_state(hf), model, mapping="hf.qwen2->torchtune.qwen2", strict=True)
    ids = tokens()
    assert (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL
    back = hf_model("qwen2", tie=True, seed=1)
    wp.transfer(model, back, mapping=wp.load_mapping("hf.qwen2->torchtune.qwen2").inverse(), strict=True)
    assert_same_tensors(back.state_dict(), hf.state_dict())


def test_a_live_gemma_whose_lm_head_aliases_its_embeddings_ports_strictly():
    # transformers' state dict lists the tied lm_head.weight; it is the embeddings' storage, counted once
    hf = hf_model("gemma")
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    model = tune_model(hf)
    wp.transfer(hf, model, mapping="hf.llama->torchtune.llama", strict=True)
    ids = tokens()
    assert (tune_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


@pytest.mark.slow  # about 1 s a pair; the first pair of each mapping also runs in tests/test_verify_inputs.py
@pytest.mark.parametrize(
    ("name", "source", "target"),
    [
        (n, s, t)
        for n in ("hf.llama->torchtune.llama", "hf.qwen2->torchtune.qwen2")
        for s, t in pairs(wp.load_mapping(n))
    ],
    ids=lambda v: str(v).split("(")[0][-24:],
)
def test_weightport_verify_passes_on_every_listed_pair(name, source, target):
    result = verify(name, source=source, target=target)
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
    assert result.round_trip is True


def test_a_torchtune_model_states_its_kv_heads_in_its_attention_modules():
    # the decoder says num_heads and head_dim; num_kv_heads is only on the attention modules
    from weightport.planning.facts import model_facts

    model = tune_model(hf_model("llama"))
    assert model_facts(model) == {"heads": 4, "kv_heads": 2, "head_dim": HEAD_DIM, "hidden": HIDDEN, "vocab": VOCAB}


def test_the_tiny_models_are_the_shapes_the_families_say():
    # guards the fixtures: GQA everywhere, MQA for Gemma, head_dim * heads == hidden (llama3's builder assumes it)
    for family in TUNE_FAMILIES:
        c = hf_model(family).config
        assert c.head_dim == HEAD_DIM and c.num_attention_heads * c.head_dim == HIDDEN and c.vocab_size == VOCAB
        assert c.num_key_value_heads == (1 if family == "gemma" else 2)
    assert set(TUNE_FAMILIES) == set(FAMILIES) - {"qwen3"}
