"""The distributed loading benchmark (``benchmarks/distributed.py``, ``run.py --models distributed``) at a
toy size: every case loads a 2-rank FSDP2 model (CPU, gloo) to the same local shards, bit for bit, as
each other and as a single-process load, and the table prints each rank's counters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import distributed  # noqa: E402

TOY = distributed.SIZES["toy"]


def test_distributed_check_refuses_a_rank_whose_shard_differs_from_the_reference():
    expected = [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    good = [{"digests": {"a": "1", "b": "2"}}, {"digests": {"a": "3", "b": "4"}}]
    assert distributed.check("t", {"good": good}, expected) == 2
    bad = [{"digests": {"a": "1", "b": "2"}}, {"digests": {"a": "3", "b": "5"}}]
    with pytest.raises(AssertionError, match="bad: rank 1's local shards differ from the reference's: \\['b'\\]"):
        distributed.check("t", {"good": good, "bad": bad}, expected)
    with pytest.raises(AssertionError, match="parameters differ"):
        distributed.check("t", {"missing": [{"digests": {"a": "1"}}, good[1]]}, expected)


def test_distributed_reference_rows_are_torch_chunk_rows_of_each_rank():
    t = torch.arange(10, dtype=torch.bfloat16).reshape(5, 2)
    rows = distributed._rows(t)
    assert [r.shape[0] for r in rows] == [3, 2]
    assert distributed.digest(rows[1]) == distributed.digest(t[3:].clone())
    assert [r.shape[0] for r in distributed._rows(t[:1])] == [1, 0]  # the second rank holds no row


def test_distributed_table_reads_rank_0_then_rank_1():
    rank = {"wall_s": 1.0, "cpu_s": 0.5, "rchar": 2**20, "file_peak_kib": 2048, "minflt": 3000, "peak_over_mib": 7}
    other = dict(rank, wall_s=2.0, rchar=3 * 2**20, peak_over_mib=9)
    half = {k: v / 2 if isinstance(v, float) else v for k, v in rank.items()}
    text = distributed.table("torchtitan", {"ours": [[rank, other]], "theirs": [[half, half]]}, 2**20, 10**6, 3)
    assert "| ours | 2.000 | 2.000–2.000 | 1.00× | 0.50 / 0.50 | 1.0 / 3.0 | 2.0 / 2.0 | 3.0 / 3.0 | 7 / 9 |" in text
    assert "| theirs | 0.500 | 0.500–0.500 | 0.25× |" in text
    assert "(3 parameters per rank" in text


@pytest.mark.slow
def test_run_py_loads_the_sharded_torchtitan_model_with_every_case_alike(tmp_path):
    pytest.importorskip("torchtitan")
    command = [sys.executable, os.path.join(BENCH, "run.py"), "--models", "distributed", "--dist-size", "toy"]
    command += ["--runs", "1", "--dist-targets", "torchtitan", "--work", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-> torchtitan Llama3Model (fused wqkv), FSDP2 on 2 ranks" in proc.stdout
    assert "transformers" not in proc.stdout
    lines = proc.stdout.splitlines()
    rows = [line.split(" | ")[0][2:] for line in lines if line.startswith("| ") and not line.startswith("| case |")]
    assert rows == distributed.chosen_cases("torchtitan")
    assert len(rows) == 4 and rows[0].startswith("weightport.transfer")
    assert "bit for bit, on every rank, each other and the rows of a single-process load (17 parameters" in proc.stdout


@pytest.mark.slow
def test_distributed_transformers_cases_agree_bit_for_bit(tmp_path):
    pytest.importorskip("transformers")
    out = distributed.run_all(str(tmp_path), 1, distributed.BROADCAST, "toy", ("transformers",), say=lambda _: None)
    assert "-> transformers LlamaForCausalLM, FSDP2 on 2 ranks" in out
    assert f"| {distributed.BROADCAST} |" in out
    assert "(21 parameters per rank" in out
