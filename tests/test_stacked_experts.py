"""Stack and unstack over a placeholder range: mixture-of-experts weights per expert vs stacked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.errors import MappingError

EXPERTS, LAYERS = 4, 2


class PerExpert(nn.Module):
    """Experts as a list of Linear layers (Mixtral in transformers 4, most checkpoints on the hub)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(LAYERS):
            layer = nn.Module()
            layer.experts = nn.ModuleList(nn.Linear(8, 6, bias=False) for _ in range(EXPERTS))
            self.layers.append(layer)


class Stacked(nn.Module):
    """Experts as one stacked parameter per layer (torchtitan's GroupedExperts, transformers 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(LAYERS):
            layer = nn.Module()
            layer.w1 = nn.Parameter(torch.zeros(EXPERTS, 6, 8))
            self.layers.append(layer)


STACK = wp.stack("layers.{i}.experts.{e}.weight", "layers.{i}.w1", over="e")


def test_stack_puts_each_expert_at_its_index():
    src = PerExpert()
    model = Stacked()
    report = wp.transfer(src, model, rules=[STACK], strict=True)
    for i in range(LAYERS):
        want = torch.stack([src.layers[i].experts[e].weight.detach() for e in range(EXPERTS)])
        assert torch.equal(model.layers[i].w1.detach(), want)
    entry = report.entries[0]
    assert entry.status == "loaded" and len(entry.sources) == EXPERTS
    assert entry.ops == ("unsqueeze(0)", "fuse[4]")


def test_stack_orders_by_index_not_by_key_order():
    sd = PerExpert().state_dict()
    shuffled = dict(sorted(sd.items(), key=lambda kv: kv[0][::-1]))  # expert 10 before 2 and the like
    model = Stacked()
    wp.transfer(shuffled, model, rules=[STACK])
    assert torch.equal(model.layers[0].w1[3], sd["layers.0.experts.3.weight"])


def test_unstack_is_the_inverse_bit_for_bit():
    src = PerExpert()
    stacked = Stacked()
    wp.transfer(src, stacked, rules=[STACK])
    back = wp.Mapping([STACK]).inverse()
    assert "unstack" in back.rules[0].text
    target = PerExpert()
    report = wp.transfer(stacked, target, mapping=back, strict=True)
    for name, t in target.state_dict().items():
        assert torch.equal(t, src.state_dict()[name]), name
    (entry,) = [e for e in report.entries if e.target == "layers.1.experts.2.weight"]
    assert entry.ops == ("take[2]",) and entry.sources == ("layers.1.w1",)


def test_a_missing_expert_leaves_the_stack_fresh_with_a_warning():
    sd = PerExpert().state_dict()
    del sd["layers.0.experts.2.weight"]
    report = wp.transfer(sd, Stacked(), rules=[STACK])
    assert [e.target for e in report.fresh] == ["layers.0.w1"]
    assert any("incomplete" in w and "layers.0.w1" in w for w in report.warnings)


def test_stack_and_unstack_in_a_mapping_file(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[[rule]]\nstack = "layers.{i}.experts.{e}.weight"\nto = "layers.{i}.w1"\nover = "e"\n')
    model = Stacked()
    wp.transfer(PerExpert(), model, mapping=wp.load_mapping(path), strict=True)
    path.write_text('[[rule]]\nunstack = "layers.{i}.w1"\nto = "layers.{i}.experts.{e}.weight"\nover = "e"\n')
    wp.transfer(model, PerExpert(), mapping=wp.load_mapping(path), strict=True)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: wp.stack("a.{e}.w", "b.{e}.w", over="e"), "must not use"),
        (lambda: wp.stack("a.{i}.w", "b.{i}.w", over="e"), "no placeholder"),
        (lambda: wp.unstack("a.w", "b.w", over="e"), "no placeholder"),
        (lambda: wp.unstack("a.{e}.w", "b.{e}.w", over="e"), "must not capture"),
        (lambda: wp.unstack("a.w", "b.{e}.{j}", over="e"), "does not capture"),
    ],
)
def test_a_malformed_stack_is_refused_where_it_is_written(make, match):
    with pytest.raises(MappingError, match=match):
        make()
