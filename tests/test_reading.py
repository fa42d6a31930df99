"""Behaviour of the performance features: zero-copy, progress, parallel reads, GPU staging,
the rule index and planning at scale. No test asserts a time."""

from __future__ import annotations

import io
import os

import pytest
import torch
from conftest import TinyNet, trained
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport import _progress, _reading
from weightport.errors import CorruptFileError
from weightport.mapping.core import Mapping


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(trained(num_classes=1000).state_dict(), path)
    return path


def _meta_net(num_classes: int = 10) -> TinyNet:
    with wp.init_empty():
        return TinyNet(num_classes=num_classes)


# -- zero copy ----------------------------------------------------------------------------------


def test_zero_copy_assigns_mapped_views_that_never_write_the_file(checkpoint):
    before = checkpoint.read_bytes()
    model = _meta_net()
    report = wp.transfer(checkpoint, model, zero_copy=True)
    params = [n for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert report.stats["zero_copy_tensors"] == len(params)
    expected = trained(num_classes=1000)
    assert torch.equal(model.conv1.weight, expected.conv1.weight)
    assert isinstance(model.conv1.weight, nn.Parameter) and model.conv1.weight.requires_grad
    with torch.no_grad():
        model.conv1.weight.add_(1.0)  # training writes: private copy-on-write pages
    assert checkpoint.read_bytes() == before
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_default_is_owning_copies(checkpoint):
    model = _meta_net()
    report = wp.transfer(checkpoint, model)
    assert report.stats["zero_copy_tensors"] == 0
    checkpoint.write_bytes(b"\0" * checkpoint.stat().st_size)  # the file changes afterwards
    assert torch.equal(model.conv1.weight, trained(num_classes=1000).conv1.weight)


@pytest.mark.parametrize("case", ["dtype", "built", "check_finite"], ids=["dtype-cast", "built-target", "check-finite"])
def test_zero_copy_falls_back_to_copies_where_it_is_not_safe(checkpoint, case):
    model = TinyNet(num_classes=10) if case == "built" else _meta_net()
    kwargs = {"dtype": torch.float16} if case == "dtype" else {"check_finite": True} if case == "check_finite" else {}
    report = wp.transfer(checkpoint, model, zero_copy=True, **kwargs)
    assert report.stats["zero_copy_tensors"] == 0
    checkpoint.write_bytes(b"\0" * checkpoint.stat().st_size)
    want = trained(num_classes=1000).conv1.weight.to(model.conv1.weight.dtype)
    assert torch.equal(model.conv1.weight, want)


def test_zero_copy_through_a_sharded_folder(tmp_path):
    import json

    state = trained(num_classes=10).state_dict()
    names = list(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = _meta_net()
    report = wp.transfer(str(tmp_path), model, zero_copy=True)
    params = dict(model.named_parameters())
    assert report.stats["zero_copy_tensors"] == len(params)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_zero_copy_from_an_in_memory_source_copies(checkpoint):
    state = trained(num_classes=1000).state_dict()
    model = _meta_net()
    report = wp.transfer(state, model, zero_copy=True)
    assert report.stats["zero_copy_tensors"] == 0
    assert model.conv1.weight.data_ptr() != state["conv1.weight"].data_ptr()


# -- progress ------------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("enabled", "tty", "size", "env", "shown"),
    [
        (None, True, _progress.THRESHOLD_BYTES, {}, True),
        (None, True, _progress.THRESHOLD_BYTES - 1, {}, False),  # small: no bar
        (None, False, 10 * _progress.THRESHOLD_BYTES, {}, False),  # not a terminal
        (False, True, 10 * _progress.THRESHOLD_BYTES, {}, False),  # switched off
        (True, False, 1, {}, True),  # forced on
        (None, True, 10 * _progress.THRESHOLD_BYTES, {"WEIGHTPORT_PROGRESS": "0"}, False),
        (None, True, 10 * _progress.THRESHOLD_BYTES, {"TQDM_DISABLE": "1"}, False),
    ],
)
def test_progress_is_shown_only_on_a_terminal_for_large_transfers(monkeypatch, enabled, tty, size, env, shown):
    monkeypatch.delenv("WEIGHTPORT_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stream = FakeTTY() if tty else io.StringIO()
    with _progress.progress(enabled, size, stream=stream) as bar:
        assert bar.shown is shown
        bar.update(size)
    assert bool(stream.getvalue()) is shown


def test_transfer_progress_counts_every_byte_and_can_be_switched_off(checkpoint, monkeypatch):
    updates: list[int] = []

    class Recorder:
        def update(self, n: int) -> None:
            updates.append(n)

        def close(self) -> None:
            updates.append(-1)

    seen: list[bool | None] = []

    def fake(enabled, total, desc="", stream=None):  # type: ignore[no-untyped-def]
        seen.append(enabled)
        return _progress.Progress(Recorder() if enabled is not False else None)

    monkeypatch.setattr(_progress, "progress", fake)
    for meta in (True, False):
        updates.clear()
        model = _meta_net() if meta else TinyNet(num_classes=10)
        report = wp.transfer(checkpoint, model, progress=True)
        assert updates[-1] == -1 and sum(updates[:-1]) == report.stats["bytes_loaded"]
        updates.clear()
        report = wp.transfer(
            checkpoint, _meta_net() if meta else TinyNet(num_classes=10), progress=True, dtype="float16"
        )
        assert sum(updates[:-1]) == report.stats["bytes_loaded"]  # source bytes, also when casting
    updates.clear()
    wp.transfer(checkpoint, _meta_net(), progress=False)
    assert updates == [] and seen[-1] is False


def test_progress_bar_draws_on_stderr_and_is_silent_when_off(checkpoint, capsys):
    wp.transfer(checkpoint, _meta_net(), progress=True)
    assert "weightport" in capsys.readouterr().err
    wp.transfer(checkpoint, _meta_net(), progress=False)
    wp.transfer(checkpoint, _meta_net())  # automatic: pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_a_broken_progress_bar_never_breaks_a_transfer(checkpoint, monkeypatch):
    class Broken:
        def update(self, n: int) -> None:
            raise OSError("terminal went away")

        def close(self) -> None:
            raise OSError("terminal went away")

    monkeypatch.setattr(_progress, "progress", lambda *a, **k: _progress.Progress(Broken()))
    model = _meta_net()
    wp.transfer(checkpoint, model, progress=True)
    assert torch.equal(model.conv1.weight, trained(num_classes=1000).conv1.weight)


# -- parallel reads ------------------------------------------------------------------------------


def test_read_workers_policy(monkeypatch):
    monkeypatch.delenv("WEIGHTPORT_READ_THREADS", raising=False)
    assert _reading.read_workers(_reading.PARALLEL_MIN_BYTES - 1, 100) == 1
    assert _reading.read_workers(10 * _reading.PARALLEL_MIN_BYTES, 1) == 1
    assert 1 <= _reading.read_workers(10 * _reading.PARALLEL_MIN_BYTES, 100) <= 4
    monkeypatch.setenv("WEIGHTPORT_READ_THREADS", "3")
    assert _reading.read_workers(1, 100) == 3
    assert _reading.read_workers(1, 2) == 2


def test_parallel_reads_give_identical_results(checkpoint, monkeypatch):
    sequential = _meta_net()
    wp.transfer(checkpoint, sequential)
    monkeypatch.setenv("WEIGHTPORT_READ_THREADS", "4")
    threads: set[str] = set()
    original = wp.sources.base.Source.read_into_many

    def spy(self, names, outs):  # type: ignore[no-untyped-def]
        import threading

        threads.add(threading.current_thread().name)
        return original(self, names, outs)

    monkeypatch.setattr(wp.sources.base.Source, "read_into_many", spy)
    monkeypatch.setattr(wp._reading, "BATCH_BYTES", 64)  # a batch per tensor or so: many batches to share
    parallel = _meta_net()
    wp.transfer(checkpoint, parallel)
    assert any(t.startswith("weightport-read") for t in threads)
    for (n, a), (_, b) in zip(sequential.state_dict().items(), parallel.state_dict().items()):
        assert n.startswith("fc.") or torch.equal(a, b), n  # fc: fresh (random) in both


def test_a_failed_parallel_read_leaves_the_model_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file(trained(num_classes=10).state_dict(), path)
    model = TinyNet(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = wp.plan(path, model, device="cpu", dtype=torch.float64)  # new tensors: the read-job path
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 16)  # the last tensor is now cut short
    monkeypatch.setenv("WEIGHTPORT_READ_THREADS", "4")
    with pytest.raises(CorruptFileError):
        plan.apply()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k


# -- GPU -----------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("meta", [True, False])
def test_cuda_targets_load_through_pinned_staging(checkpoint, monkeypatch, meta):
    fills: list[bool] = []
    original = _reading.Stager.fill

    def spy(self, out, read):  # type: ignore[no-untyped-def]
        fills.append(out.is_cuda)
        return original(self, out, read)

    monkeypatch.setattr(_reading.Stager, "fill", spy)
    model = _meta_net() if meta else TinyNet(num_classes=10)
    wp.transfer(checkpoint, model, device="cuda")
    assert fills and all(fills)
    assert all(t.is_cuda for t in model.state_dict().values())
    assert torch.equal(model.conv1.weight.cpu(), trained(num_classes=1000).conv1.weight)


@cuda
@pytest.mark.cuda
def test_stager_bounds_pinned_memory_in_flight():
    stager = _reading.Stager(limit=1024)
    outs = [torch.empty(1000, device="cuda") for _ in range(4)]
    for i, out in enumerate(outs):
        stager.fill(out, lambda buf, i=i: buf.fill_(i))
        assert stager._bytes <= 1024 or len(stager._in_flight) == 1
    stager.copy(outs[0], torch.full((1000,), 7.0))
    stager.finish()
    assert [float(o[0]) for o in outs] == [7.0, 1.0, 2.0, 3.0]


# -- rule index and planning at scale ------------------------------------------------------------


def test_rule_index_keeps_first_match_order_across_index_kinds():
    rules = [
        wp.strip_prefix("model."),  # variable length, indexed by its first segment
        wp.rename("model.layers.{i}.w", "fixed.{i}"),  # fixed skeleton, later: must lose
        wp.drop("**.inv_freq"),  # truly variable: tried for every key
        wp.rename("other.{rest*}", "o.{rest}"),
    ]
    m = Mapping(rules)
    assert m.resolve("model.layers.3.w").outputs[0].target == "layers.3.w"
    assert m.resolve("other.a.b").outputs[0].target == "o.a.b"
    assert m.resolve("x.rotary.inv_freq").dropped
    assert m.resolve("model.rotary.inv_freq").outputs[0].target == "rotary.inv_freq"  # first rule wins
    assert m.resolve("modelx.a").rule is None  # a head is a whole segment, not a prefix
    reordered = Mapping([rules[1], rules[0]])
    assert reordered.resolve("model.layers.3.w").outputs[0].target == "fixed.3"


def test_planning_many_keys_with_many_rules_is_exact(tmp_path):
    layers, experts, projs = 10, 25, 4  # 1000 keys: the same shape as the 100k benchmark case
    state = {
        f"model.layers.{i}.mlp.experts.{e}.proj_{p}.weight": torch.zeros(2)
        for i in range(layers)
        for e in range(experts)
        for p in range(projs)
    }
    state["lm_head.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "many.safetensors")
    rules = [wp.rename(f"model.layers.{{i}}.attn.head_{k}.{{p}}", f"blocks.{{i}}.h{k}.{{p}}") for k in range(190)]
    rules += [
        wp.rename(f"model.layers.{{i}}.mlp.experts.{{e}}.proj_{p}.weight", f"b.{{i}}.{{e}}.w{p}") for p in range(4)
    ]
    rules += [wp.drop("lm_head.*"), wp.strip_prefix("model.")]

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for p in range(projs):
                self.register_parameter(f"w{p}", nn.Parameter(torch.ones(2)))

    model = nn.Module()
    model.b = nn.ModuleList(nn.ModuleList(Expert() for _ in range(experts)) for _ in range(layers))
    plan = wp.plan(tmp_path / "many.safetensors", model, rules=rules, strict=True)
    assert len(plan.recipes) == layers * experts * projs and plan.report.dropped == ("lm_head.weight",)
    assert plan.recipes["b.3.7.w2"].inputs[0].key == "model.layers.3.mlp.experts.7.proj_2.weight"
    assert "b.3.7.w2" in plan.recipes and "b.3.7.w9" not in plan.recipes
    # the plain lane's recipes and report rows are made on demand: planning and the summary make neither
    assert plan.report.entries._all is None
    assert "1000 loaded" in plan.summary() and plan.report.entries._all is None
    assert plan.report["b.3.7.w2"].sources == ("model.layers.3.mlp.experts.7.proj_2.weight",)
    plan.apply()
    assert all(float(p.detach().sum()) == 0.0 for p in model.parameters())
