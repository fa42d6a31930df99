"""Training checkpoints of sharded (FSDP2) models: one DCP folder, resumed bitwise on 2 ranks, and read
into an unsharded model through a mapping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import weightport as wp
from weightport.errors import CheckpointError

pytestmark = pytest.mark.slow

SAVE_AT = 3  # steps before the checkpoint
STEPS = 6  # steps in all


def _sharded_mlp(seed: int, ranks: int = 2) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))
    mesh = init_device_mesh("cpu", (ranks,))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model: nn.Module, opt: Any, sched: Any, steps: range, rank: int) -> list[float]:
    losses = []
    for step in steps:
        data = torch.Generator().manual_seed(1000 * step + rank)  # the data; dropout draws from the global RNG
        x, y = torch.randn(4, 8, generator=data), torch.randn(4, 5, generator=data)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _local(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _uninterrupted_and_save(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    model, opt, sched = _sharded_mlp(seed=0)
    torch.manual_seed(100 + rank)  # each rank its own random stream (dropout)
    out: dict[str, Any] = {"losses": _train(model, opt, sched, range(SAVE_AT), rank)}
    path = wp.checkpoint.save(
        folder, model=model, optimizer=opt, scheduler=sched, epoch=1, step=SAVE_AT, extra={"note": "halfway"}
    )
    out["path"] = str(path)
    out["full_at_save"] = {n: p.full_tensor() for n, p in model.named_parameters()}
    out["exp_avg_at_save"] = {n: opt.state[p]["exp_avg"].full_tensor() for n, p in model.named_parameters()}
    out["exp_avg_dtensor"] = all(isinstance(opt.state[p]["exp_avg"], DTensor) for p in model.parameters())
    out["losses"] += _train(model, opt, sched, range(SAVE_AT, STEPS), rank)
    out["final"] = _local(model)
    out["info"] = wp.checkpoint.info(folder).lines()
    # a file name for a sharded model is refused on every rank, naming the fix; nothing is written
    try:
        wp.checkpoint.save(os.path.join(os.path.dirname(folder), "x.safetensors"), model=model)
    except CheckpointError as e:
        out["file_refused"] = str(e)
    # a failure on one rank only: every rank raises, the previous checkpoint stays
    try:
        wp.checkpoint.save(folder, model=model, extra={"bad": object()} if rank == 1 else {})
    except CheckpointError as e:
        out["one_rank_failed"] = str(e)
    out["after_failure"] = wp.checkpoint.info(folder).step
    again = folder + "-again"  # a second save at a path replaces the checkpoint there
    for step in (1, 2):
        wp.checkpoint.save(again, model=model, optimizer=opt, step=step)
    out["replaced"] = wp.checkpoint.info(again).step
    return out


def _resume_and_continue(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    model, opt, sched = _sharded_mlp(seed=1)  # other initial weights: all must come from the checkpoint
    torch.manual_seed(7)
    before = _local(model)
    damaged = folder + "-damaged"  # rank 1's chunk of 0.weight overwritten: DCP fails on rank 1 only
    if rank == 0:
        _damage_rank_1_chunk(folder, damaged)
    torch.distributed.barrier()
    try:
        wp.checkpoint.resume(damaged, model=model, optimizer=opt, scheduler=sched)
    except CheckpointError as e:  # DCP's CheckpointException (a BaseException) turned into a WeightportError
        dcp_failed = str(e)
    other = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9) if rank == 1 else sched
    try:  # a failure on rank 1 only: every rank raises, and no rank's model or optimizer changed
        wp.checkpoint.resume(folder, model=model, optimizer=opt, scheduler=other)
    except CheckpointError as e:
        failed = str(e)
    unchanged = all(torch.equal(before[n], t) for n, t in _local(model).items()) and not opt.state
    state = wp.checkpoint.resume(folder, model=model, optimizer=opt, scheduler=sched)
    out: dict[str, Any] = {
        "dcp_failed": dcp_failed,
        "one_rank_failed": failed,
        "unchanged": unchanged,
        "epoch": state.epoch,
        "step": state.step,
        "extra": state.extra,
        "restored": state.restored,
        "summary": state.summary(),
        "exp_avg_dtensor": all(isinstance(opt.state[p]["exp_avg"], DTensor) for p in model.parameters()),
    }
    out["losses"] = _train(model, opt, sched, range(SAVE_AT, STEPS), rank)
    out["final"] = _local(model)
    wider = _wider()  # strict=False: what matches loads, the rest keeps its values and gets fresh state
    before = wider[0].weight.to_local().clone()
    wider_opt = torch.optim.AdamW(wider.parameters(), lr=1e-2)
    loose = wp.checkpoint.resume(folder, model=wider, optimizer=wider_opt, strict=False)
    out["loose"] = (loose.report.counts(), dict(loose.optimizer.fresh) if loose.optimizer else None)
    out["loose_kept"] = torch.equal(wider[0].weight.to_local(), before)
    out["loose_with_state"] = [n for n, p in wider.named_parameters() if wider_opt.state.get(p)]
    sgd = torch.optim.SGD(wider.parameters(), lr=0.1, momentum=0.9)  # another optimizer class: a note
    out["other_class"] = (wp.checkpoint.resume(folder, model=wider, optimizer=sgd, strict=False).notes, len(sgd.state))
    mgr = wp.checkpoint.Manager(folder + "-runs", keep_last=2, keep_best=0)  # rotation of sharded folders
    for step in (10, 20, 30):
        mgr.save(model=model, optimizer=opt, step=step)
    out["rotated"] = [p.name for p in mgr.list()]
    out["rotated_resume"] = mgr.resume(model=model, optimizer=opt).step  # type: ignore[union-attr]
    # errors on every rank, never a BaseException from DCP: a missing folder, a changed shape
    for name, call in (
        ("missing", lambda: wp.checkpoint.resume(folder + "-nope", model=model)),
        ("changed", lambda: wp.checkpoint.resume(folder, model=_wider(), strict=True)),
    ):
        try:
            call()
        except CheckpointError as e:
            out[name] = str(e)
    return out


def _damage_rank_1_chunk(folder: str, damaged: str) -> None:
    import shutil

    from weightport.sources._dcp_metadata import read_metadata

    shutil.copytree(folder, damaged)
    stored = read_metadata(damaged).metadata.storage_data
    chunk = next(v for k, v in stored.items() if k.fqn == "model/0.weight" and v.relative_path == "__1_0.distcp")
    with open(os.path.join(damaged, chunk.relative_path), "r+b") as f:
        f.seek(chunk.offset)
        f.write(b"\0" * chunk.length)


def _wider() -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(8, 18), nn.ReLU(), nn.Dropout(0.3), nn.Linear(18, 5))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    return model


class _Renamed(nn.Module):
    """The saved MLP under other names: ``body`` and ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)


_RULES = [wp.rename("0.{p}", "body.{p}"), wp.rename("3.{p}", "head.{p}")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    folder = str(tmp_path_factory.mktemp("dcp") / "step3")
    return folder, run_ranks(_uninterrupted_and_save, folder)


def test_sharded_save_writes_one_dcp_folder_with_each_rank_shards(saved: tuple[str, list[dict[str, Any]]]) -> None:
    folder, ranks = saved
    assert [r["path"] for r in ranks] == [folder, folder]
    names = sorted(os.listdir(folder))
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    assert all(os.path.getsize(os.path.join(folder, n)) > 0 for n in names)
    assert not [n for n in os.listdir(Path(folder).parent) if n.startswith(".")]  # no temporary folder left
    assert all(r["exp_avg_dtensor"] for r in ranks)
    text = "\n".join(ranks[0]["info"])
    assert "epoch 1, step 3" in text and "torch.optim.adamw.AdamW" in text and "StepLR" in text
    assert "DCP folder written by 2 ranks" in text and "rng: torch" in text and "model: torch.nn.modules" in text
    with wp.open_source(folder) as source:  # like a checkpoint file, the folder opens as its model part
        assert sorted(source) == ["0.bias", "0.weight", "3.bias", "3.weight"]
        assert torch.equal(source["0.weight"], ranks[0]["full_at_save"]["0.weight"])


def test_sharded_save_refuses_a_file_name_and_agrees_on_failure(saved: tuple[str, list[dict[str, Any]]]) -> None:
    _, ranks = saved
    for r in ranks:
        assert "pass a folder path" in r["file_refused"]
        assert "failed on rank 1 of 2: extra['bad']" in r["one_rank_failed"]
        assert r["after_failure"] == SAVE_AT  # the checkpoint in place was not touched
        assert r["replaced"] == 2


def test_sharded_resume_on_two_ranks_continues_bitwise(saved: tuple[str, list[dict[str, Any]]]) -> None:
    folder, first = saved
    second = run_ranks(_resume_and_continue, folder)
    for rank in (0, 1):
        a, b = first[rank], second[rank]
        assert (b["epoch"], b["step"], b["extra"]) == (1, SAVE_AT, {"note": "halfway"})
        assert {"model", "optimizer", "scheduler", "rng:torch"} <= set(b["restored"])
        assert b["exp_avg_dtensor"]
        assert "failed on rank 1 of 2" in b["one_rank_failed"] and "ExponentialLR" in b["one_rank_failed"]
        assert b["unchanged"]
        assert "reading the checkpoint's shards failed (rank 1: " in b["dcp_failed"]
        assert b["losses"] == a["losses"][SAVE_AT:]  # floats compared exactly
        assert a["final"].keys() == b["final"].keys()
        for name in a["final"]:
            assert torch.equal(a["final"][name], b["final"][name]), name
        assert "opening the checkpoint failed on ranks 0, 1 of 2" in b["missing"] and "-nope" in b["missing"]
        assert "ranks 0, 1 of 2" in b["changed"] and "pass mapping=" in b["changed"]
        counts, fresh = b["loose"]
        assert (counts["loaded"], counts["fresh"]) == (1, 3) and b["loose_kept"]
        assert b["loose_with_state"] == ["3.bias"]  # the others start with no state, as on one process
        notes, sgd_states = b["other_class"]
        assert any("the one passed is a torch.optim.sgd.SGD" in n for n in notes) and sgd_states == 0
        assert [n.split("-")[1] for n in b["rotated"]] == ["s00000020", "s00000030"] and b["rotated_resume"] == 30
        assert b["rotated"] == second[0]["rotated"]  # one name for every rank, from rank 0
        assert sorted(os.listdir(folder + "-runs")) == b["rotated"]  # older folders removed, no leftovers
        assert fresh == {n: "its weight was not loaded" for n in ("0.weight", "0.bias", "3.weight")}


def test_dcp_checkpoint_resumes_into_an_unsharded_renamed_model(saved: tuple[str, list[dict[str, Any]]]) -> None:
    folder, ranks = saved
    model = _Renamed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = wp.checkpoint.resume(folder, model=model, optimizer=opt, rules=_RULES)
    full, moments = ranks[0]["full_at_save"], ranks[0]["exp_avg_at_save"]
    for saved_name, new_name in (("0", "body"), ("3", "head")):
        for p in ("weight", "bias"):
            param = model.get_parameter(f"{new_name}.{p}")
            assert torch.equal(param.detach(), full[f"{saved_name}.{p}"])
            assert torch.equal(opt.state[param]["exp_avg"], moments[f"{saved_name}.{p}"])
    assert state.step == SAVE_AT and state.optimizer is not None and len(state.optimizer.carried) == 4
    assert "rng:torch" in state.restored  # rank 0's random states on one process
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)  # the scheduler's decay, saved in the group
    weights = wp.transfer(wp.checkpoint.weights(folder), _Renamed(), rules=_RULES)
    assert weights.counts()["loaded"] == 4


def _resume_renamed_sharded(rank: int, world_size: int, folder: str, file: str) -> list[dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    outs = []
    # the sharded folder through rules, and a single file of the same names (an unsharded run moved to FSDP2)
    for path, rules in ((folder, _RULES), (file, [])):
        torch.manual_seed(5)
        model = _Renamed()
        mesh = init_device_mesh("cpu", (2,))
        for layer in (model.body, model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = wp.checkpoint.resume(path, model=model, optimizer=opt, rules=rules)
        outs.append(
            {
                "step": state.step,
                "carried": dict(state.optimizer.carried) if state.optimizer else {},
                "restored": state.restored,
                "local": _local(model),
                "exp_avg": {n: opt.state[p]["exp_avg"].to_local().clone() for n, p in model.named_parameters()},
                "exp_avg_dtensor": all(isinstance(opt.state[p]["exp_avg"], DTensor) for p in model.parameters()),
                "lr": opt.param_groups[0]["lr"],
            }
        )
        x = torch.randn(4, 8)
        loss = model.head(torch.relu(model.body(x))).sum()  # it trains on: state and parameters agree
        loss.backward()
        opt.step()
    return outs


def test_dcp_checkpoint_resumes_into_a_renamed_sharded_model(saved: tuple[str, list[dict[str, Any]]]) -> None:
    from dist_harness import shard_rows

    folder, first = saved
    unsharded = _Renamed()
    unsharded_opt = torch.optim.AdamW(unsharded.parameters(), lr=1e-2)
    wp.checkpoint.resume(folder, model=unsharded, optimizer=unsharded_opt, rules=_RULES)
    file = str(Path(folder).parent / "renamed.safetensors")
    wp.checkpoint.save(file, model=unsharded, optimizer=unsharded_opt, step=SAVE_AT)
    ranks = run_ranks(_resume_renamed_sharded, folder, file)
    full, moments = first[0]["full_at_save"], first[0]["exp_avg_at_save"]
    for rank, got in ((r, got) for r, outs in enumerate(ranks) for got in outs):
        assert got["step"] == SAVE_AT and len(got["carried"]) == 4 and "optimizer" in got["restored"]
        assert got["exp_avg_dtensor"] and got["lr"] == pytest.approx(1e-2 * 0.5)
        for saved_name, new_name in (("0", "body"), ("3", "head")):
            for p in ("weight", "bias"):
                start, length = shard_rows(rank, 2, full[f"{saved_name}.{p}"].shape[0])
                rows = slice(start, start + length)
                assert torch.equal(got["local"][f"{new_name}.{p}"], full[f"{saved_name}.{p}"][rows])
                assert torch.equal(got["exp_avg"][f"{new_name}.{p}"], moments[f"{saved_name}.{p}"][rows])


def _resume_on_three_ranks(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    model, opt, sched = _sharded_mlp(seed=1, ranks=3)
    state = wp.checkpoint.resume(folder, model=model, optimizer=opt, scheduler=sched)
    return {
        "local": _local(model),
        "exp_avg": {n: opt.state[p]["exp_avg"].to_local().clone() for n, p in model.named_parameters()},
        "restored": state.restored,
        "notes": state.notes,
    }


def test_dcp_checkpoint_of_two_ranks_resumes_on_three(saved: tuple[str, list[dict[str, Any]]]) -> None:
    from dist_harness import shard_rows

    folder, first = saved
    ranks = run_ranks(_resume_on_three_ranks, folder, world_size=3)
    full, moments = first[0]["full_at_save"], first[0]["exp_avg_at_save"]
    for rank, got in enumerate(ranks):
        for name, tensor in full.items():  # DCP reshards: each rank reads its rows of 3
            start, length = shard_rows(rank, 3, tensor.shape[0])
            assert torch.equal(got["local"][name], tensor[start : start + length]), (rank, name)
            assert torch.equal(got["exp_avg"][name], moments[name][start : start + length]), (rank, name)
        assert {"model", "optimizer", "scheduler"} <= set(got["restored"])
    assert "rng:torch" in ranks[1]["restored"] and "rng:torch" not in ranks[2]["restored"]
    assert "the checkpoint holds no RNG states for this rank (saved by fewer ranks)" in ranks[2]["notes"]
