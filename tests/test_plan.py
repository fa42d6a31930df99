"""Planning: matching, policies, scope, strictness, collisions, tied weights — without reading data."""

from __future__ import annotations

import pytest
import torch
from conftest import TiedLM, TinyNet, digest, trained
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import CollisionError, PlanError, ShapeMismatchError, StrictnessError, TargetError
from weightport.sources import _mapped


def test_plan_reads_no_tensor_data_and_changes_nothing(tmp_path, monkeypatch):
    src_model = trained(num_classes=1000)
    save_file(src_model.state_dict(), tmp_path / "w.safetensors")
    torch.save({"net": src_model.state_dict()}, tmp_path / "w.pth")
    model = TinyNet(num_classes=10)
    before = digest(model)
    reads = []
    monkeypatch.setattr(_mapped.MappedFile, "_map", lambda self: reads.append(self.path))
    monkeypatch.setattr(_mapped.MappedFile, "read_run", lambda *a: reads.append("read_run"))
    for name in ("w.safetensors", "w.pth"):
        p = wp.plan(tmp_path / name, model)
        assert p.report.applied is False
        assert {e.status for e in p.entries} == {"loaded", "fresh"}
    assert reads == []
    assert digest(model) == before


def test_shape_mismatch_skip_reports_both_shapes(tiny):
    p = wp.plan(trained(num_classes=1000).state_dict(), tiny)
    fc = p.report["fc.weight"]
    assert (fc.status, fc.reason, fc.source_shape, fc.target_shape) == ("fresh", "shape mismatch", (1000, 8), (10, 8))
    assert p.report.skipped == [p.report["fc.weight"], p.report["fc.bias"]]
    assert p.report.unused_reasons["fc.weight"] == "shape mismatch with 'fc.weight'"


def test_shape_mismatch_error_names_keys_shapes_and_fix(tiny):
    with pytest.raises(ShapeMismatchError, match=r"'fc.weight'.*\(1000, 8\).*\(10, 8\)(.|\n)*on_mismatch='skip'"):
        wp.plan(trained(num_classes=1000).state_dict(), tiny, on_mismatch="error")


def test_unknown_policy_is_refused(tiny):
    with pytest.raises(PlanError, match="on_mismatch must be one of"):
        wp.plan(tiny.state_dict(), tiny, on_mismatch="maybe")


def test_missing_and_unused_and_dropped(tiny):
    state = trained().state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["bn1.running_var"]
    p = wp.plan(state, tiny, rules=[wp.drop("blocks.1.**")])
    r = p.report
    assert r["bn1.running_var"].reason == "missing"
    assert r["blocks.1.0.weight"].reason == "dropped"
    assert r.unused == ("extra.weight",)
    assert set(r.dropped) == {"blocks.1.0.weight", "blocks.1.0.bias"}


def test_into_submodule_and_bad_into():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = TinyNet()
            self.head = nn.Linear(8, 2)

    model = Wrapper()
    head_before = digest(model.head)
    r = wp.transfer(trained().state_dict(), model, into="backbone")
    assert r.into == "backbone" and all(e.status == "loaded" for e in r.entries)
    assert {e.target for e in r.entries} == set(TinyNet().state_dict())
    assert digest(model.head) == head_before
    with pytest.raises(TargetError, match="into='backbon'.*did you mean 'backbone'"):
        wp.plan(trained().state_dict(), model, into="backbon")


def test_strict_names_what_is_missing_and_unused(tiny):
    state = trained().state_dict()
    state["extra"] = torch.zeros(1)
    del state["fc.bias"]
    with pytest.raises(StrictnessError) as e:
        wp.plan(state, tiny, strict=True)
    assert "fc.bias" in str(e.value) and "extra" in str(e.value)
    wp.plan(trained().state_dict(), tiny, strict=True)  # a complete match passes


def test_require_globs(tiny):
    state = trained(num_classes=1000).state_dict()
    wp.plan(state, tiny, require=("conv1.*", "blocks.*"))
    with pytest.raises(StrictnessError, match=r"require='fc\.\*': not loaded: fc.weight, fc.bias"):
        wp.plan(state, tiny, require=("fc.*",))
    with pytest.raises(StrictnessError, match=r"require=.decoder\.\*. matched no target; target names look like"):
        wp.plan(state, tiny, require=("decoder.*",))


def test_two_sources_writing_one_target_are_refused(tiny):
    state = trained().state_dict()
    state["old_fc.weight"] = state["fc.weight"].clone()
    with pytest.raises(CollisionError) as e:
        wp.plan(state, tiny, rules=[wp.rename("old_fc.{p}", "fc.{p}")])
    msg = str(e.value)
    assert "'fc.weight'" in msg and "'old_fc.weight'" in msg and "old_fc.{p}" in msg and "same name" in msg


def test_rule_that_matched_nothing_is_a_warning(tiny, tmp_path):
    p = wp.plan(trained().state_dict(), tiny, rules=[wp.rename("encoder.{p*}", "{p}")])
    assert any("matched no source tensor" in w and "encoder.{p*}" in w for w in p.report.warnings)
    # so is a rule of the user's own mapping file; a drop with nothing to drop is not
    (tmp_path / "m.toml").write_text('[[rule]]\nrename = "stem.{p}"\nto = "conv1.{p}"\n\n[[rule]]\ndrop = "aux.**"\n')
    p = wp.plan(trained().state_dict(), tiny, mapping=str(tmp_path / "m.toml"))
    assert [w for w in p.report.warnings if "matched no source tensor" in w] == [
        f"rule {tmp_path / 'm.toml'} rule 1 (rename): 'stem.{{p}}' -> 'conv1.{{p}}' matched no source tensor"
    ]


def test_shipped_mappings_do_not_warn_about_optional_parts():
    """torchvision.vit->timm.vit covers ViTs with and without pre_logits; a plain ViT is no news."""
    from torchvision.models.vision_transformer import VisionTransformer

    src = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    timm = pytest.importorskip("timm")
    tgt = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2
    )
    p = wp.plan(src, tgt, mapping="torchvision.vit->timm.vit", strict=True)
    assert not [w for w in p.report.warnings if "matched no source tensor" in w]


def test_tied_parameters_load_once_and_are_never_fresh():
    src = TiedLM()
    state = {k: v for k, v in src.state_dict().items() if k != "head.weight"}  # as HF saves tied weights
    target = TiedLM()
    r = wp.transfer(state, target, strict=True)
    assert r["head.weight"].status == "loaded" and r["head.weight"].tied_to == "embed.weight"
    assert target.head.weight is target.embed.weight
    assert torch.equal(target.head.weight, src.embed.weight)
    assert r.coverage == 1.0


def test_tied_target_with_both_names_in_source_warns():
    src = TiedLM()
    state = dict(src.state_dict())
    state["head.weight"] = torch.randn_like(state["head.weight"])
    r = wp.plan(state, TiedLM()).report
    assert any("tied" in w for w in r.warnings)
    assert "head.weight" in r.unused


def test_fuse_incomplete_is_reported():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

    state = {"q.weight": torch.ones(4, 4), "k.weight": torch.ones(4, 4)}
    p = wp.plan(state, QKV(), rules=[wp.fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}")], allow_empty=True)
    assert p.report["qkv.weight"].status == "fresh"
    assert any("incomplete" in w for w in p.report.warnings)


def test_split_sizes_follow_the_targets_for_uneven_parts():
    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8, bias=False)
            self.k = nn.Linear(8, 2, bias=False)
            self.v = nn.Linear(8, 2, bias=False)

    fused = torch.arange(12 * 8, dtype=torch.float32).reshape(12, 8)
    model = GQA()
    r = wp.transfer({"qkv.weight": fused}, model, rules=[wp.split("qkv.{p}", ["q.{p}", "k.{p}", "v.{p}"])], strict=True)
    assert torch.equal(model.k.weight, fused[8:10]) and torch.equal(model.v.weight, fused[10:12])
    assert r["v.weight"].status == "loaded" and r["v.weight"].ops == ("split[3/3]",)


def test_module_version_hooks_are_replayed():
    from conftest import with_metadata
    from torchvision.models.vision_transformer import MLPBlock

    ref = MLPBlock(8, 16, 0.0)
    sd = ref.state_dict()
    old = with_metadata(
        {
            "linear_1.weight": sd["0.weight"],
            "linear_1.bias": sd["0.bias"],
            "linear_2.weight": sd["3.weight"],
            "linear_2.bias": sd["3.bias"],
        },
        {"": {"version": 1}},
    )
    target = MLPBlock(8, 16, 0.0)
    r = wp.transfer(old, target, strict=True)
    assert "MLPBlock._load_from_state_dict" in r["0.weight"].rule
    x = torch.randn(3, 8)
    torch.testing.assert_close(target(x), ref(x), rtol=0, atol=0)


def test_targets_are_the_tensors_of_the_state_dict_with_their_kind():
    from weightport.planning.targets import collect_targets

    class MyParam(nn.Parameter):
        pass

    class WithExtra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.special = MyParam(torch.ones(2))
            self.register_buffer("count", torch.zeros(()))
            self.tied = self.fc  # the same tensors under a second name

        def get_extra_state(self):
            return {"version": 3}

        def set_extra_state(self, state):
            pass

    model = WithExtra()
    assert "_extra_state" in model.state_dict()
    targets = collect_targets(model)
    assert list(targets) == ["special", "count", "fc.weight", "fc.bias", "tied.weight", "tied.bias"]
    assert [t.is_parameter for t in targets.values()] == [True, False, True, True, True, True]
    assert targets["tied.weight"].canonical == "fc.weight" and targets["special"].canonical == "special"
    assert targets["count"].tensor is model.count


def _state_dict_models():
    import torchvision

    shared = nn.Linear(2, 2)
    with_shared = nn.Sequential(shared, nn.ReLU(), shared)
    nobias = nn.Sequential(nn.Linear(3, 3, bias=False), nn.BatchNorm1d(3), nn.Identity())
    nonpersistent = nn.Linear(2, 2)
    nonpersistent.register_buffer("cache", torch.zeros(2), persistent=False)
    nonpersistent.register_buffer("kept", torch.ones(2))
    nonpersistent.register_buffer("absent", None)
    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked[0].register_state_dict_post_hook(lambda module, sd, prefix, local: [sd.pop(prefix + "bias")] and None)
    prehooked = nn.Sequential(nn.Linear(2, 2))
    prehooked.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)

    class Saves(nn.Linear):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            destination[prefix + "only"] = self.weight

    class Extra(nn.Linear):
        def get_extra_state(self):
            return torch.ones(1)

        def set_extra_state(self, state):
            pass

    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def state_dict(self, *args, **kwargs):
            return {"renamed": self.fc.weight}

    return {
        "resnet18": torchvision.models.resnet18(),
        "vit": torchvision.models.VisionTransformer(32, 16, 2, 2, 32, 64, num_classes=3),
        "shared": with_shared,
        "none entries": nobias,
        "non-persistent": nonpersistent,
        "post hook": hooked,
        "pre hook": prehooked,
        "_save_to_state_dict": nn.Sequential(Saves(2, 2)),
        "extra state": nn.Sequential(Extra(2, 2)),
        "state_dict override": nn.Sequential(nn.Linear(1, 1), Whole()),
    }


@pytest.mark.parametrize("name", list(_state_dict_models()))
def test_state_tensors_is_the_state_dict_keeping_vars(name):
    from weightport.planning.targets import state_tensors

    model = _state_dict_models()[name]
    expected = model.state_dict(keep_vars=True)
    got = state_tensors(model)
    assert list(got) == list(expected)
    for k, v in expected.items():  # the same objects; extra state is made anew by each call
        assert got[k] is v or (k.endswith("_extra_state") and torch.equal(got[k], v)), k


def test_a_shape_torch_cannot_build_does_not_break_a_loading_hook_replay():
    from weightport._hooks import replay
    from weightport.mapping.rules import Output

    class Hooked(torch.nn.Linear):
        def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return super()._load_from_state_dict(*args, **kwargs)

    routed = [("weight", None, Output("weight"))]
    out = replay(Hooked(2, 2), routed, {"weight": (0, 2**63)}, {"weight": torch.float32}, None)
    assert out == routed  # left as it was: no TypeError from building the meta stand-in


def test_a_transfer_that_loads_nothing_is_refused_with_the_likely_cause():
    from weightport.errors import NothingLoadedError, StrictnessError

    state = trained().state_dict()
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lightning = {f"model.{k}": v for k, v in state.items()}  # a Lightning-style checkpoint
    with pytest.raises(NothingLoadedError, match=r"starts with 'model\.'.*strip_prefix\('model\.'\)") as info:
        wp.transfer(lightning, model)
    assert info.value.report is not None and len(info.value.report.fresh) == len(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert isinstance(info.value, StrictnessError)  # the CLI's exit 1
    wrapped = nn.Sequential()
    wrapped.add_module("net", TinyNet())
    with pytest.raises(NothingLoadedError, match=r"add_prefix\('net\.'\)"):
        wp.plan(state, wrapped)
    ckpt = {f"model/{k}": v for k, v in state.items()}
    with pytest.raises(NothingLoadedError, match="weightport training checkpoint"):
        wp.plan(ckpt, TinyNet())
    other = {"encoder.layer.0.weight": torch.zeros(3), "encoder.layer.0.bias": torch.zeros(3)}
    with pytest.raises(NothingLoadedError, match="weightport suggest SOURCE TARGET"):
        wp.plan(other, TinyNet())
    report = wp.transfer(other, model, allow_empty=True)  # intended: allowed, and reported
    assert not report.loaded and len(report.unused) == 2
