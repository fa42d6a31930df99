"""Deciding a plan is sharded (and the pieces of a sharded transfer that need no process group)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.report import TransferReport


def test_import_weightport_leaves_torch_distributed_checkpoint_unimported() -> None:
    """DCP pulls in sympy (seconds): only a sharded transfer imports it."""
    code = "import sys, weightport; print('torch.distributed.checkpoint' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_plain_model_is_applied_by_the_single_process_path() -> None:
    model = nn.Linear(3, 2)
    plan = wp.plan(nn.Linear(3, 2).state_dict(), model)
    from weightport.apply import apply_plan

    assert plan.applier is apply_plan


@pytest.mark.parametrize("bad", [0, -1, "10", True, None])
def test_timeout_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(wp.errors.OptionError, match="timeout must be a positive number of seconds"):
        wp.plan(nn.Linear(3, 2).state_dict(), nn.Linear(3, 2), timeout=bad)


def test_the_report_prints_and_exports_the_bytes_each_rank_read() -> None:
    report = TransferReport(entries=[], bytes_read_per_rank=(3 * 2**20, 2048))
    assert "source bytes read per rank: rank 0: 3.0 MiB, rank 1: 2.0 KiB" in report.summary()
    assert report.to_dict()["bytes_read_per_rank"] == [3 * 2**20, 2048]
    assert "bytes read per rank" not in TransferReport(entries=[]).summary()


def test_a_distributed_error_keeps_each_ranks_failure_through_pickling() -> None:
    import pickle

    e = wp.errors.DistributedError("reading failed", {1: "OpError: boom"})
    back = pickle.loads(pickle.dumps(e))
    assert (
        isinstance(back, wp.WeightportError) and back.failures == {1: "OpError: boom"} and str(back) == "reading failed"
    )
    assert torch.distributed.is_available()
