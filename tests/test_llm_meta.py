"""The shipped mappings for Meta's ``consolidated.pth`` Llama layout, on tiny random models.

``hf.llama->meta.llama`` (Hugging Face Llama / Mistral to Meta's names, q and k permuted to
interleaved rotary pairs) and ``meta.llama->torchtune.llama`` (names only). Checked against
torchtune's converters (``tune_to_meta(hf_to_tune(...))``, ``meta_to_tune``) bit for bit, by logits
of :class:`weightport.models.llama.Llama` (Meta's reference computation) and of torchtune's model
against transformers', and by round trips. A Meta checkpoint folder (``consolidated.00.pth`` +
``params.json``) ports with the head counts read from its ``params.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llm_models import FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, hf_logits, hf_model, tokens
from torch import nn

import weightport as wp
from weightport.errors import SourceNotFoundError
from weightport.mapping.verify import pairs, verify
from weightport.models.llama import Llama, LlamaParams

pytest.importorskip("transformers")

META_FAMILIES = ("llama", "mistral")
ATOL = 1e-5
HF_TO_META = "hf.llama->meta.llama"
META_TO_TUNE = "meta.llama->torchtune.llama"


def params(hf: nn.Module) -> dict[str, object]:
    """The ``params.json`` Meta would write for ``hf``'s sizes (its feed-forward width by Meta's rule)."""
    c = hf.config
    return {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "multiple_of": 16,
        "ffn_dim_multiplier": 0.65,  # int(0.65 * int(2 * 4 * 64 / 3)) = 110 -> 112, rounded up to 16
        "norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"],
        "use_scaled_rope": False,
    }


def meta_model(hf: nn.Module) -> Llama:
    torch.manual_seed(1)
    return Llama(LlamaParams.from_dict(params(hf))).eval()


def meta_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in got if not torch.equal(got[k], want[k])]
    assert not differ, f"not bit-identical: {differ}"


def test_the_meta_params_give_the_tiny_models_sizes():
    p = LlamaParams.from_dict(params(hf_model("llama")))
    assert (p.ffn_dim, p.head_dim, p.kv_heads) == (FFN, HEAD_DIM, KV_HEADS)


@pytest.mark.parametrize(
    ("dim", "multiplier", "multiple_of", "ffn"),
    [(4096, None, 256, 11008), (4096, 1.3, 1024, 14336), (2048, 1.5, 256, 8192)],  # Llama 2 7B, 3 8B, 3.2 1B
)
def test_feed_forward_width_follows_metas_rule(dim, multiplier, multiple_of, ffn):
    assert LlamaParams(dim=dim, ffn_dim_multiplier=multiplier, multiple_of=multiple_of).ffn_dim == ffn


@pytest.mark.parametrize("family", META_FAMILIES)
def test_hf_to_meta_equals_torchtunes_tune_to_meta_of_hf_to_tune(family):
    convert_weights = pytest.importorskip("torchtune.models.convert_weights")
    hf = hf_model(family)
    model = meta_model(hf)
    wp.transfer(hf.state_dict(), model, mapping=HF_TO_META, strict=True)
    state = hf.state_dict()
    want = convert_weights.tune_to_meta(
        convert_weights.hf_to_tune(state, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=HIDDEN, head_dim=HEAD_DIM)
    )
    assert_same_tensors(model.state_dict(), want)


@pytest.mark.parametrize("family", META_FAMILIES)
def test_meta_reference_logits_equal_transformers_logits(family):
    hf = hf_model(family)
    model = meta_model(hf)
    wp.transfer(hf, model, mapping=HF_TO_META, strict=True)
    ids = tokens()
    assert (meta_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_the_meta_reference_is_not_fooled_by_the_half_layout():
    # Without the rotary permutation the names line up and the logits do not: the reference model
    # really rotates adjacent pairs.
    hf = hf_model("llama")
    model = meta_model(hf)
    plain = wp.Mapping([r for r in wp.load_mapping(HF_TO_META).rules if "q_proj" not in str(r)])
    plain = wp.Mapping(
        [wp.rename("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"), *plain]
    )
    wp.transfer(hf, model, mapping=plain, strict=False)
    ids = tokens()
    assert (meta_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", META_FAMILIES)
def test_meta_round_trip_back_to_transformers_is_bit_identical(family):
    hf = hf_model(family)
    model = meta_model(hf)
    mapping = wp.load_mapping(HF_TO_META)
    wp.transfer(hf, model, mapping=mapping, strict=True)
    back = hf_model(family, seed=1)
    wp.transfer(model, back, mapping=mapping.inverse(), strict=True)
    assert_same_tensors(back.state_dict(), hf.state_dict())


@pytest.mark.parametrize("family", META_FAMILIES)
def test_meta_to_torchtune_equals_meta_to_tune_and_gives_transformers_logits(family):
    convert_weights = pytest.importorskip("torchtune.models.convert_weights")
    from torchtune.models.llama3 import llama3

    hf = hf_model(family)
    meta = meta_model(hf)
    wp.transfer(hf, meta, mapping=HF_TO_META, strict=True)
    p = meta.params
    tune = llama3(
        vocab_size=p.vocab_size,
        num_layers=p.n_layers,
        num_heads=p.n_heads,
        num_kv_heads=p.kv_heads,
        embed_dim=p.dim,
        intermediate_dim=p.ffn_dim,
        max_seq_len=128,
        rope_base=int(p.rope_theta),
        norm_eps=p.norm_eps,
    ).eval()
    state = {**meta.state_dict(), "rope.freqs": torch.zeros(HEAD_DIM // 2)}  # Llama 2 files carry it
    wp.transfer(state, tune, mapping=META_TO_TUNE, strict=True)
    assert_same_tensors(tune.state_dict(), convert_weights.meta_to_tune(state))
    ids = tokens()
    with torch.no_grad():
        assert (tune(ids) - hf_logits(hf, ids)).abs().max().item() < ATOL
    again = meta_model(hf)
    wp.transfer(tune, again, mapping=wp.load_mapping(META_TO_TUNE).inverse(), strict=True)
    assert_same_tensors(again.state_dict(), meta.state_dict())


def test_a_tied_checkpoint_fills_metas_output_from_the_embeddings():
    hf = hf_model("llama", tie=True)
    state = hf.state_dict()
    del state["lm_head.weight"]  # as save_pretrained writes a tied model (Llama 3.2 1B)
    model = meta_model(hf)
    report = wp.transfer(state, model, mapping=HF_TO_META, strict=True)
    assert torch.equal(model.output.weight, state["model.embed_tokens.weight"])
    entry = report["output.weight"]
    assert entry.sources == ("model.embed_tokens.weight",) and "like 'tok_embeddings.weight'" in str(entry.rule)
    ids = tokens()
    assert (meta_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


def save_meta_folder(hf: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """A Meta checkpoint folder of ``hf``'s weights: consolidated.00.pth and params.json."""
    model = meta_model(hf)
    wp.transfer(hf, model, mapping=HF_TO_META, strict=True)
    folder.mkdir(exist_ok=True)
    state = model.state_dict()
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params(hf)))
    return state


def bare_like(model: nn.Module) -> nn.Module:
    """Empty parameters under ``model``'s state-dict names in plain modules: no config, no attributes."""
    root = nn.Module()
    for name, tensor in model.state_dict().items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]  # type: ignore[assignment]
        module.register_parameter(leaf, nn.Parameter(torch.zeros_like(tensor)))
    return root


def test_a_meta_folder_ports_into_transformers_names_with_head_counts_from_params_json(tmp_path: Path):
    hf = hf_model("llama")
    save_meta_folder(hf, tmp_path / "Llama-tiny")
    # the target says nothing about heads: the folder's params.json is the only place they are written
    target = bare_like(hf)
    wp.transfer(tmp_path / "Llama-tiny", target, mapping=wp.load_mapping(HF_TO_META).inverse(), strict=True)
    assert_same_tensors(target.state_dict(), hf.state_dict())


def test_a_transformers_folder_ports_to_meta_names_with_head_counts_from_config_json(tmp_path: Path):
    hf = hf_model("mistral")
    hf.save_pretrained(tmp_path)
    want = meta_model(hf)
    wp.transfer(hf, want, mapping=HF_TO_META, strict=True)
    target = bare_like(want)
    wp.transfer(tmp_path, target, mapping=HF_TO_META, strict=True)
    assert_same_tensors(target.state_dict(), want.state_dict())


def test_a_meta_folder_loads_into_the_reference_model_built_from_its_params(tmp_path: Path):
    hf = hf_model("mistral")
    state = save_meta_folder(hf, tmp_path)
    model = Llama(LlamaParams.from_json(tmp_path)).eval()
    wp.transfer(tmp_path, model, strict=True)
    assert_same_tensors(model.state_dict(), state)
    ids = tokens()
    assert (meta_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_params_json_missing_names_the_folder(tmp_path: Path):
    with pytest.raises(SourceNotFoundError, match="params.json"):
        LlamaParams.from_json(tmp_path)


def test_reference_model_sizes():
    model = Llama(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=VOCAB, hidden_dim=FFN)
    assert model.layers[0].attention.wk.weight.shape == (KV_HEADS * HEAD_DIM, HIDDEN)
    assert model(tokens()).shape == (2, 12, VOCAB)


@pytest.mark.slow  # about 1 s a pair; the first pair of each mapping also runs in tests/test_verify_inputs.py
@pytest.mark.parametrize(
    ("name", "source", "target"),
    [(n, s, t) for n in (HF_TO_META, META_TO_TUNE) for s, t in pairs(wp.load_mapping(n))],
    ids=lambda v: str(v).split("(")[0][-24:],
)
def test_weightport_verify_passes_on_every_listed_pair(name, source, target):
    if "torchtune" in target:
        pytest.importorskip("torchtune")
    result = verify(name, source=source, target=target)
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
    assert result.round_trip is True
