"""The words every rank raises with when ranks disagree (``weightport.distributed.agree``)."""

from __future__ import annotations

from torch.distributed.checkpoint import CheckpointException

from weightport.distributed.agree import dcp_failures, describe, failed


def test_describe_names_each_rank_and_each_distinct_message_once() -> None:
    assert describe({1: "boom"}, 2) == "rank 1 of 2: boom"
    assert describe({0: "gone", 2: "gone", 1: "other"}, 3) == "ranks 0, 2 of 3: gone; rank 1 of 3: other"
    assert describe({1: "boom"}) == "rank 1: boom"
    assert describe({}) == ""


def test_failed_keeps_the_ranks_that_failed() -> None:
    assert failed([(None, 1), ("no", 2), (None, 3)]) == {1: "no"}


def test_dcp_failures_reads_each_ranks_exception_from_a_checkpoint_exception() -> None:
    e = CheckpointException("load failed", {1: (ValueError("bad rows"), None)})
    assert isinstance(e, BaseException) and not isinstance(e, Exception)  # the trap: except Exception misses it
    assert dcp_failures(e) == {1: "ValueError: bad rows"}
    assert dcp_failures(RuntimeError("not DCP's")) == {}
