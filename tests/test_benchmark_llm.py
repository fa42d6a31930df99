"""The LLM porting benchmark (``benchmarks/llm.py``, ``run.py --models llm``) at a toy size: its
streamed checkpoint is a valid Hugging Face Llama folder, and every case (weightport, litgpt's and
torchtitan's own converters) ports it to the same state dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import llm  # noqa: E402

TOY = llm.SIZES["toy"]


def test_llm_checkpoint_is_written_tensor_by_tensor_as_a_llama_folder(tmp_path):
    from safetensors.torch import load_file

    llm.write_checkpoint(str(tmp_path), TOY)
    state = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(TOY.shapes())
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert all(v.std() > 0 for v in state.values())  # random, not zeros
    norm = state["model.layers.0.input_layernorm.weight"].float()
    assert 0.5 < norm.mean() < 1.5  # norms near 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (TOY.heads, TOY.kv_heads)
    assert llm.SIZES["0.5b"].parameters() == pytest.approx(0.5e9, rel=0.05)


@pytest.mark.slow
def test_llm_benchmark_cases_agree_bit_for_bit(tmp_path):
    pytest.importorskip("litgpt")
    pytest.importorskip("torchtitan")
    path = llm.prepare(str(tmp_path), "toy")
    llm.preload("check")
    assert llm.check(path, TOY) == {"litgpt": 3 + 7 * TOY.layers, "torchtitan": 3 + 9 * TOY.layers}


@pytest.mark.slow
def test_run_py_measures_the_llm_cases_side_by_side(tmp_path):
    pytest.importorskip("litgpt")
    pytest.importorskip("torchtitan")
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "run.py"), "--models", "llm", "--llm-size", "toy", "--runs", "1"]
        + ["--only", "weightport", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for target in ("litgpt", "torchtitan"):
        assert f"-> {target}" in proc.stdout
    assert proc.stdout.count("| weightport.transfer, zero_copy=True |") == 2
    assert proc.stdout.count("state dict equals weightport's, bit for bit") == 2
