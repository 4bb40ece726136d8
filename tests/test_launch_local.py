"""`torchx run -s local_cwd launch/components.py:train` on this machine: 2 ranks under
torchrun, a tiny training run, rank 0's summary.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchx_local_cwd_two_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'[data]\npath = "{tiny_dataset}"\nglobal_batch_size = 128\neval_batch_size = 512\n\n'
        '[model]\nkind = "shared_bottom"\nshared_layers = [16]\ntower_layers = [8]\n\n'
        '[train]\nsteps = 12\nlog_every = 6\n\n[balance]\nmethod = "equal"\n'
    )
    out_dir = tmp_path / "run"
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    cmd = [os.path.join(bindir, "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
           "launch/components.py:train", "--config", str(config), "--output_dir", str(out_dir), "-j", "1x2",
           "--cpu", "2", "--metrics_port", "0", "--metrics_host", "127.0.0.1", "--", "train.seed=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "SUCCEEDED" in log, log[-4000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 12
    assert summary["examples_seen"] == 12 * 128
    assert summary["global_batch_size"] == 128
    assert set(summary["tasks"]) == {"click", "conversion"}
