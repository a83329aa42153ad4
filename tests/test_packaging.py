"""``pip install .`` into a clean virtual environment (no test extra, no workflow tools) gives a ctvq whose
every command runs: runtime dependencies are exactly what the library imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_runs_every_command(tmp_path: Path) -> None:
    from train_helpers import write_config, write_data

    from ctvq.cli import COMMANDS

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pins = ROOT / "requirements" / "cpu.txt"
    source = tmp_path / "source"  # building in the checkout would leave build/ there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "ctvq", source / "ctvq", ignore=shutil.ignore_patterns("__pycache__"))
    install = [str(python), "-m", "pip", "install", "-q", "-c", str(pins), "-r", str(pins), str(source)]
    done = subprocess.run(install, capture_output=True, encoding="utf-8", errors="replace", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"

    def ctvq(*args: object) -> subprocess.CompletedProcess[str]:
        # utf-8 whatever the locale (CI may run with LANG unset: ASCII): help texts hold "mm³"
        return subprocess.run([str(venv / "bin" / "ctvq"), *map(str, args)], capture_output=True,
                              encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path, env=env)

    for name in COMMANDS:
        assert ctvq(name, "--help").returncode == 0, name
    imported = subprocess.run([str(python), "-c", "import snakemake"], capture_output=True, env=env)
    assert imported.returncode != 0, "the workflow tools are an extra, not a dependency of the library"
    scan = tmp_path / "p.nii.gz"
    steps = [("phantom", "-o", scan, "--shape", "64", "64", "24"),
             ("window", scan, "--window", "lung", "--resolution", "64", "-o", tmp_path / "w.npz"),
             ("sdf", tmp_path / "w.npz", "-o", tmp_path / "b.npz"),
             ("index", tmp_path / "b.npz", "-o", tmp_path / "s.npz"),
             ("manifest", tmp_path / "s.npz", "-o", tmp_path / "m.csv")]
    for step in steps:
        run = ctvq(*step)
        assert run.returncode == 0, (step, run.stderr[-2000:])
    data = write_data(tmp_path / "data", cases=2)
    config = write_config(tmp_path / "cfg.json", max_steps=2)
    assert ctvq("validate-config", config).returncode == 0
    run = ctvq("train", "--config", config, "--data", data, "--output-dir", tmp_path / "run",
               "--threads", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = tmp_path / "run" / "ckpts" / "final.pt"
    assert ctvq("inspect-weights", ckpt).returncode == 0
    run = ctvq("eval", "--ckpt", ckpt, "--data", data, "-o", tmp_path / "metrics.json", "--allow-collapse")
    assert run.returncode == 0, run.stderr[-3000:]
    assert ctvq("encode", "--ckpt", ckpt, data.parent / "c1.npz", "-o", tmp_path / "t.npz").returncode == 0
    run = ctvq("decode", "--ckpt", ckpt, tmp_path / "t.npz", "-o", tmp_path / "r.ply", "--allow-empty")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "r.ply").is_file()
