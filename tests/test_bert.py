"""weightport.models.Bert and the shipped mapping hf.bert->weightport.bert, checked against transformers."""

from __future__ import annotations

import json

import pytest
import torch

import weightport as wp
from weightport.errors import SourceError, SourceNotFoundError, StrictnessError
from weightport.models import Bert, BertConfig, mean_pool

transformers = pytest.importorskip("transformers")

MAPPING = "hf.bert->weightport.bert"
TINY = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every float tensor random, so a wrong mapping (swapped q/k, missing LayerNorm) shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random BertModel saved the way from_pretrained expects (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    model = _randomised(transformers.BertModel(transformers.BertConfig(**TINY)))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _batch(vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    segments = torch.zeros_like(ids)
    segments[0, 5:] = 1
    return ids, mask, segments


def test_config_from_hf_reads_the_sizes(hf_folder):
    folder, _ = hf_folder
    cfg = BertConfig.from_hf(folder)
    assert (cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.mlp, cfg.max_positions) == (50, 32, 2, 4, 48, 24)
    assert BertConfig.from_hf(folder / "config.json", pooler=True).pooler


@pytest.mark.parametrize(("key", "value"), [("hidden_act", "relu"), ("position_embedding_type", "relative_key")])
def test_config_refuses_variants_the_model_does_not_compute(key, value):
    with pytest.raises(SourceError, match=key):
        BertConfig.from_hf({**TINY, key: value})


def test_config_missing_file_names_the_path(tmp_path):
    with pytest.raises(SourceNotFoundError, match="config.json"):
        BertConfig.from_hf(tmp_path)


def test_port_matches_transformers_hidden_states_and_pooler(hf_folder):
    folder, reference = hf_folder
    model = Bert(BertConfig.from_hf(folder, pooler=True))
    report = wp.transfer(folder, model, mapping=MAPPING, strict=True)
    assert report.coverage == 1.0
    # transformers >= 4.31 no longer saves the position_ids buffer; older checkpoints (MiniLM) do
    assert set(report.dropped) <= {"embeddings.position_ids"} and not report.unused
    assert not report.adapted and report.exact_coverage == 1.0  # fusing q/k/v is exact: loaded, ops listed
    assert {e.target for e in report.loaded if e.ops == ("fuse[3]",)} == {
        f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in ("weight", "bias")
    }
    ids, mask, segments = _batch()
    with torch.no_grad():
        ours = model.eval()(ids, mask, segments)
        theirs = reference(input_ids=ids, attention_mask=mask, token_type_ids=segments)
    keep = mask.bool()  # padded positions are not compared: both models leave them meaningless
    torch.testing.assert_close(ours[keep], theirs.last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pooled(ours), theirs.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_pool(ours, mask), mean_pool(theirs.last_hidden_state, mask), atol=1e-5, rtol=1e-5)


def test_qkv_order_matters(hf_folder):
    """Fusing in the order k, q, v must break parity: the test above would catch a wrong mapping."""
    folder, reference = hf_folder
    base = wp.load_mapping(MAPPING)
    swapped = wp.fuse(
        [f"encoder.layer.{{i}}.attention.self.{w}.{{p}}" for w in ("key", "query", "value")],
        "blocks.{i}.attn.qkv.{p}",
    )
    model = Bert(BertConfig.from_hf(folder))
    wp.transfer(folder, model, mapping=base, rules=[swapped])
    ids, mask, _ = _batch()
    with torch.no_grad():
        ours, theirs = model.eval()(ids, mask), reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max() > 1e-3


def test_without_pooler_the_pooler_tensors_are_reported_unused(hf_folder):
    folder, _ = hf_folder
    model = Bert(BertConfig.from_hf(folder))
    report = wp.transfer(folder, model, mapping=MAPPING)
    assert sorted(report.unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert not report.fresh
    with pytest.raises(StrictnessError, match="pooler.dense"):
        wp.transfer(folder, Bert(BertConfig.from_hf(folder)), mapping=MAPPING, strict=True)


def test_inverse_mapping_ports_back_into_transformers(hf_folder):
    folder, _ = hf_folder
    ours = _randomised(Bert(BertConfig.from_hf(folder, pooler=True)), seed=3)
    back = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    report = wp.transfer(ours, back, mapping=wp.load_mapping(MAPPING).inverse())
    assert [e.target for e in report.fresh] in ([], ["embeddings.position_ids"])
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask)[mask.bool()], back(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        )


def test_the_mapping_file_is_listed_and_valid():
    assert MAPPING in wp.list_mappings()
    text = json.dumps([r.text for r in wp.load_mapping(MAPPING).rules])
    assert "attn.qkv" in text


def test_hidden_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        Bert(BertConfig(vocab_size=10, hidden=30, heads=4, layers=1, mlp=8))


def test_pooled_without_pooler_says_how_to_build_it():
    model = Bert(BertConfig(vocab_size=10, hidden=8, heads=2, layers=1, mlp=8))
    with pytest.raises(ValueError, match="pooler=True"):
        model.pooled(torch.zeros(1, 3, 8))


def test_an_all_padding_row_stays_finite_and_does_not_disturb_the_others(hf_folder):
    folder, reference = hf_folder
    model = Bert(BertConfig.from_hf(folder))
    wp.transfer(folder, model, mapping=MAPPING)
    ids, mask, _ = _batch()
    mask[0] = 0
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(ours).all()  # what such a row holds is meaningless, but it must not be NaN
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)


def test_too_long_input_says_so():
    model = Bert(BertConfig(vocab_size=10, hidden=8, heads=2, layers=1, mlp=8, max_positions=4))
    with pytest.raises(ValueError, match="max_positions=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
