"""docs/distributed.md's script runs as written under torchrun, on 2 CPU processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dist_harness import free_port
from llm_models import hf_model

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def _script() -> str:
    return re.search(r"```python\n(# load\.py.*?)```", DOC.read_text(), re.S).group(1)  # type: ignore[union-attr]


def test_the_documented_script_loads_a_llama_on_two_ranks(tmp_path: Path) -> None:
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "tiny-llama")
    c = hf.config
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "hidden_dim": c.intermediate_size,
        "norm_eps": c.rms_norm_eps,
    }
    (tmp_path / "tiny-llama" / "original").mkdir()
    (tmp_path / "tiny-llama" / "original" / "params.json").write_text(json.dumps(params))
    (tmp_path / "load.py").write_text(_script())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "load.py", "tiny-llama"], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line]
    assert lines[0].startswith("transferred: 21 loaded, 0 adapted, 0 fresh of 21 target tensors"), done.stdout
    assert lines[-1].startswith("source bytes read per rank: rank 0:") and "rank 1:" in lines[-1]
    shown = re.search(r"```text\n(transferred:.*?)```", DOC.read_text(), re.S)
    assert shown is not None and shown.group(1).splitlines() == lines  # the doc shows what it prints
