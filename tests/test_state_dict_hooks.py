"""Targets behind state-dict hooks: a module that holds one real tensor but saves it as others made
from it (torchtitan's ``FusedQKVLinear``: a ``wqkv`` parameter saved as ``wq``/``wk``/``wv``) is
targeted by its real tensors, and a checkpoint in the saved layout loads through the module's own
loading hook, bit for bit, all or nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.planning.targets import collect_targets


def _split_on_save(module, state, prefix, local):
    for p in ("weight", "bias"):
        t = state.pop(f"{prefix}qkv.{p}")
        rows = t.reshape(-1, 3, *t.shape[1:])  # rows interleaved q k v: the saved layout holds them apart
        for i, name in enumerate("qkv"):
            state[f"{prefix}{name}.{p}"] = rows[:, i].contiguous()


def _merge_on_load(state, prefix, *args):
    for p in ("weight", "bias"):
        keys = [f"{prefix}{name}.{p}" for name in "qkv"]
        if all(k in state for k in keys):
            state[f"{prefix}qkv.{p}"] = torch.stack([state.pop(k) for k in keys], 1).flatten(0, 1)


class Fused(nn.Module):
    """One real ``qkv`` Linear (rows interleaved q, k, v), saved and loaded as ``q``, ``k``, ``v``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(3, 12)
        self.register_state_dict_post_hook(_split_on_save)
        self._register_load_state_dict_pre_hook(_merge_on_load)


class Packed(nn.Module):
    """One flat buffer saved as ``a`` (2, 3) and ``b`` (4,): parts whose trailing shapes differ."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("packed", torch.zeros(10))
        self.register_state_dict_post_hook(self._save)
        self._register_load_state_dict_pre_hook(self._load)

    @staticmethod
    def _save(module, state, prefix, local):
        t = state.pop(prefix + "packed")
        state[prefix + "a"], state[prefix + "b"] = t[:6].reshape(2, 3).clone(), t[6:].clone()

    @staticmethod
    def _load(state, prefix, *args):
        if prefix + "a" in state and prefix + "b" in state:
            state[prefix + "packed"] = torch.cat([state.pop(prefix + "a").flatten(), state.pop(prefix + "b")])


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), Fused(), Packed())
    with torch.no_grad():
        model[2].packed.normal_()
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_targets_are_the_tensors_modules_hold_not_those_a_state_dict_hook_makes():
    assert list(_model(0).state_dict()) == ["0.weight", "0.bias", "1.q.weight", "1.k.weight", "1.v.weight"] + [
        "1.q.bias",
        "1.k.bias",
        "1.v.bias",
        "2.a",
        "2.b",
    ]
    assert list(collect_targets(_model(0))) == ["0.weight", "0.bias", "1.qkv.weight", "1.qkv.bias", "2.packed"]


def test_a_checkpoint_in_the_saved_layout_loads_through_the_modules_own_loading_hook(tmp_path):
    source, model = _model(0), _model(1)
    wp.save(source.state_dict(), tmp_path / "saved.safetensors")
    report = wp.transfer(tmp_path / "saved.safetensors", model, strict=True)
    assert _same(model, source)
    assert [e.target for e in report.entries] == list(collect_targets(model))  # one entry per real tensor
    entry = next(e for e in report.entries if e.target == "1.qkv.weight")
    assert entry.status == "loaded" and sorted(entry.sources) == ["1.k.weight", "1.q.weight", "1.v.weight"]
    assert entry.ops[-1] == "Fused loading hook" and "Fused's loading hook" in (entry.rule or "")
    assert not report.unused and not report.dropped


def test_the_real_tensor_loads_by_its_own_name():
    source, model = _model(0), _model(1)
    state = dict(source.named_parameters()) | dict(source.named_buffers())
    wp.transfer(state, model, strict=True)
    assert _same(model, source)


def test_parts_of_different_shapes_reach_the_hook_in_their_own_shapes():
    source, model = _model(0), _model(1)
    state = {k: v for k, v in source.state_dict().items() if k.startswith("2.")}
    report = wp.transfer(state, model[2:], strict=True)
    assert torch.equal(model[2].packed, source[2].packed)
    assert report.entries[0].sources == ("2.a", "2.b")


def test_ops_of_a_rule_run_before_the_hook():
    source, model = _model(0), _model(1)
    state = source.state_dict()
    state["1.k.weight"] = state["1.k.weight"].t().contiguous()  # stored transposed
    rule = wp.transform("1.k.weight", "1.k.weight", "transpose")
    wp.transfer(state, model, rules=[rule], strict=True)
    assert _same(model, source)


def test_an_incomplete_set_of_parts_loads_nothing_and_says_so():
    source, model = _model(0), _model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v for k, v in source.state_dict().items() if k != "1.v.weight"}
    report = wp.transfer(state, model)
    assert next(e for e in report.entries if e.target == "1.qkv.weight").status == "fresh"
    assert torch.equal(model.state_dict()["1.q.weight"], before["1.q.weight"])


def test_a_failure_after_planning_leaves_the_model_unchanged():
    source, model = _model(0), _model(1)
    state = source.state_dict()
    state["1.v.weight"][0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(wp.WeightportError, match=r"1\.v\.weight"):
        wp.transfer(state, model, check_finite=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_meta_built_target_is_filled_through_the_hook():
    source = _model(0)
    with wp.init_empty():
        model = nn.Sequential(nn.Linear(4, 3), Fused(), Packed())
    wp.transfer(source.state_dict(), model, strict=True)
    assert _same(model, source)


# -- torchtitan's own model ---------------------------------------------------------------------------


def _titan_same(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return list(pa) == list(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_torchtitan_fused_attention_is_targeted_by_its_wqkv_parameter():
    from tests.titan_models import llama3

    model, _ = llama3()
    names = list(collect_targets(model))
    assert "layers.0.attention.qkv_linear.wqkv.weight" in names
    assert not any(n.endswith(("wq.weight", "wk.weight", "wv.weight")) for n in names)
    assert len(names) == len(list(model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("source_fused", [True, False], ids=["from-fused", "from-separate"])
def test_torchtitan_state_dict_loads_into_the_fused_model_bit_for_bit(source_fused):
    from tests.titan_models import llama3

    source, _ = llama3(fuse_qkv=source_fused, seed=0)
    model, _ = llama3(seed=1)
    report = wp.transfer(source.state_dict(), model, strict=True)
    reference, _ = llama3(seed=1)
    reference.load_state_dict(source.state_dict())  # torchtitan's own way, through its hooks
    assert _titan_same(model, reference)
    wqkv = [e for e in report.entries if e.target.endswith("wqkv.weight")]
    assert len(report.entries) == len(list(model.parameters())) and len(wqkv) == 2
    assert all(e.status == "loaded" and len(e.sources) == 3 for e in wqkv)


@pytest.mark.slow
def test_torchtitan_fused_model_saves_into_the_separate_model():
    from tests.titan_models import llama3

    source, _ = llama3(seed=0)
    model, _ = llama3(fuse_qkv=False, seed=1)
    wp.transfer(source, model, strict=True)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_torchtitan_dcp_checkpoint_of_the_fused_model_loads_back_bit_for_bit(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tests.titan_models import llama3

    source, _ = llama3(seed=0)
    dcp.save(source.state_dict(), checkpoint_id=tmp_path / "step-0")  # what torchtitan's trainer writes
    dcp_to_torch_save(tmp_path / "step-0", tmp_path / "step-0.pt")
    with wp.init_empty():
        model, _ = llama3(seed=1)
    wp.transfer(tmp_path / "step-0.pt", model, strict=True)
    assert _titan_same(model, source)


@pytest.mark.slow
def test_torchtitan_failure_when_applying_leaves_the_fused_model_unchanged():
    from tests.titan_models import llama3

    source, _ = llama3(seed=0)
    model, _ = llama3(seed=1)
    state = source.state_dict()
    state["layers.1.attention.qkv_linear.wk.weight"][3, 3] = float("inf")
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(wp.WeightportError, match=r"layers\.1\.attention\.qkv_linear\.wk\.weight"):
        wp.transfer(state, model, check_finite=True)
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


@pytest.mark.slow
def test_torchtitan_wqkv_parameter_is_a_target_of_a_grouped_fuse():
    from tests.titan_models import llama3

    source, _ = llama3(fuse_qkv=False, seed=0)  # separate wq/wk/wv parameters
    model, _ = llama3(seed=1)
    parts = [f"layers.{{i}}.attention.qkv_linear.{w}.weight" for w in ("wq", "wk", "wv")]
    fused = wp.fuse(parts, "layers.{i}.attention.qkv_linear.wqkv.weight", groups="$kv_heads")
    report = wp.transfer(source, model, rules=[fused], strict=True)  # $kv_heads from the model's attention
    reference, _ = llama3(seed=1)
    reference.load_state_dict(source.state_dict())
    assert _titan_same(model, reference)
    entry = next(e for e in report.entries if e.target == "layers.0.attention.qkv_linear.wqkv.weight")
    assert entry.ops == ("fuse[3, groups=2]",) and not any("hook" in op for op in entry.ops)
