"""Tied tensors: a tie rule fills a target the source lacks; source aliases of one storage count once."""

from __future__ import annotations

import pytest
import torch
from conftest import TiedLM
from torch import nn

import weightport as wp
from weightport.errors import MappingError


class Untied(nn.Module):
    """An embedding and a separate output projection (litgpt's lm_head, torchtitan's output)."""

    def __init__(self, vocab: int = 20, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def _tied_checkpoint() -> dict[str, torch.Tensor]:
    """A checkpoint of a tied model that stores the embedding only (as safetensors and HF do)."""
    torch.manual_seed(0)
    sd = TiedLM().state_dict()
    del sd["head.weight"]
    return sd


TIE = wp.tie("head.weight", like="embed.weight")


def test_a_tie_fills_an_absent_target_from_what_feeds_the_other_and_says_so():
    src, model = _tied_checkpoint(), Untied()
    report = wp.transfer(src, model, rules=[TIE], strict=True)
    assert torch.equal(model.head.weight.detach(), src["embed.weight"])
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()  # filled, not tied in the model
    (entry,) = [e for e in report.entries if e.target == "head.weight"]
    assert entry.status == "loaded" and entry.sources == ("embed.weight",)
    assert entry.rule == "tie 'head.weight' like 'embed.weight' (absent from the source)"


def test_without_a_tie_the_absent_target_is_fresh():
    report = wp.transfer(_tied_checkpoint(), Untied())
    assert [e.target for e in report.fresh] == ["head.weight"]


def test_a_tie_takes_the_other_targets_ops_too():
    src = {"emb.w": torch.randn(20, 6), "norm.weight": torch.ones(6), "norm.bias": torch.zeros(6)}
    rules = [wp.transform("emb.w", "embed.weight", "scale", factor=2.0), TIE]
    model = Untied()
    report = wp.transfer(src, model, rules=rules)
    assert torch.equal(model.head.weight.detach(), 2 * src["emb.w"])
    (entry,) = [e for e in report.entries if e.target == "head.weight"]
    assert entry.status == "adapted" and entry.ops == ("scale(2.0)",)


def test_a_tie_is_not_used_when_the_source_has_the_target():
    torch.manual_seed(1)
    src = Untied().state_dict()
    model = Untied()
    report = wp.transfer(src, model, rules=[TIE], strict=True)
    assert torch.equal(model.head.weight.detach(), src["head.weight"])
    (entry,) = [e for e in report.entries if e.target == "head.weight"]
    assert entry.sources == ("head.weight",) and entry.rule is None


def test_a_tie_in_a_mapping_file_and_its_inverse(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('name = "a->b"\n[[rule]]\ntie = "head.weight"\nlike = "embed.weight"\n')
    mapping = wp.load_mapping(path)
    model = Untied()
    wp.transfer(_tied_checkpoint(), model, mapping=mapping, strict=True)
    assert torch.equal(model.head.weight.detach(), _tied_checkpoint()["embed.weight"])
    assert len(mapping.inverse()) == 0  # nothing to undo, like a drop
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\ntie = "head.{p}"\nlike = "embed.{p}"\n')
    with pytest.raises(MappingError, match=r"bad.toml rule 1 \(tie\).*literal"):
        wp.load_mapping(bad)


@pytest.mark.parametrize("form", ["dict", "torch file"])
def test_a_source_alias_of_a_loaded_tensor_is_used_not_unused(tmp_path, form):
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm = nn.Embedding(20, 6), nn.LayerNorm(6)

    source = TiedLM().state_dict()  # head.weight and embed.weight: one storage
    if form == "torch file":
        torch.save(source, tmp_path / "tied.pt")
        source = tmp_path / "tied.pt"
    report = wp.transfer(source, NoHead(), strict=True)
    assert report.unused == ()
    assert "the same tensor as 'embed.weight'" in report.consumed["head.weight"]
    assert "used without a target of their own (1): head.weight" in report.summary()


def test_equal_values_in_separate_storages_are_not_aliases(tmp_path):
    sd = TiedLM().state_dict()
    sd["head.weight"] = sd["head.weight"].clone()
    torch.save(sd, tmp_path / "untied.pt")
    with wp.open_source(tmp_path / "untied.pt") as src:
        assert not src.same_tensor("embed.weight", "head.weight")
        assert src.aliases(list(src)) == {}
    torch.save(TiedLM().state_dict(), tmp_path / "tied.pt")
    with wp.open_source(tmp_path / "tied.pt") as src:
        assert src.same_tensor("embed.weight", "head.weight")
        assert src.aliases(["head.weight"]) == {"head.weight": ["embed.weight"]}


def test_inspect_counts_a_tied_tensor_once(tmp_path, capsys):
    from weightport import cli

    torch.save(TiedLM().state_dict(), tmp_path / "tied.pt")  # embed 20x6, norm 6 + 6, head = embed
    assert cli.main(["inspect", str(tmp_path / "tied.pt")]) == 0
    out = capsys.readouterr().out
    assert "4 tensors, 132 elements" in out and "1 name(s) share another's storage" in out
