"""A real out-of-memory during training (the address space capped under the process) is one line: what ran
out, ctvq plan's patch, and where the same command resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_helpers import write_cases, write_manifest

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys
import torch  # noqa: F401  (the imports' address space is not what the cap is for)
import ctvq.cli.train, ctvq.train.trainer  # noqa: F401
from ctvq.cli import main

def vm_bytes():
    with open('/proc/self/status') as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith('VmSize:'))

limit = vm_bytes() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def test_out_of_memory_in_a_training_step_prints_the_plan_and_the_resume_point(tmp_path: Path):
    manifest = write_manifest(tmp_path / "m.csv", write_cases(tmp_path, [22.0, 26.0]))
    config = json.loads((ROOT / "configs" / "vqvae" / "tiny_stage1.json").read_text())
    config["models"]["vqvae"]["args"]["model_channels"] = 256  # AdamW's state alone outgrows the cap
    config_file = tmp_path / "wide.json"
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    command = ["train", "--config", str(config_file), "--data", str(manifest), "--output-dir",
               str(tmp_path / "run"), "--max-steps", "3", "--threads", "1", "--no-tensorboard"]
    done = subprocess.run([sys.executable, "-c", CHILD, "200", *command], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert line.startswith("ctvq train: error: out of host memory (could not allocate ")
    assert "ctvq plan predicts" in line and "merge {" in line and str(config_file) in line
    assert line.endswith("no checkpoint yet: the same command starts again from the beginning")
