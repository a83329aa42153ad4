"""Running the project's Snakefile for real in a scratch folder: a small pipeline config and the
snakemake command line (the ctvq of this environment on PATH)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def write_config(workdir: Path, **overrides) -> Path:
    """``workdir``/pipeline.yaml: 2 lung phantoms at 64³, 3 training steps, ``overrides`` on top."""
    config = {
        "inputs": {"phantoms": 2},
        "windows": ["lung"],
        "resolution": 64,
        "band": 3.0,
        "min_points": 100,
        "results": "results",
        "train": {
            "windows": ["lung"],
            "stage1_config": str(ROOT / "configs" / "vqvae" / "tiny_stage1.json"),
            "stage2_config": str(ROOT / "configs" / "vqvae" / "tiny_stage2.json"),
            "max_steps": 3,
            "threads": 1,
        },
        # 3 steps learn no surface: ctvq eval would exit 3 (collapse); these tests are about the DAG
        "evaluate": {"allow_collapse": True},
    }
    config.update(overrides)
    path = workdir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Snakemake on the project's Snakefile with ``workdir``/pipeline.yaml, run in ``workdir``."""
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "pipeline.yaml"), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)


def job_counts(output: str) -> dict[str, int]:
    """Jobs per rule, from the "Job stats" table Snakemake prints."""
    table = output.split("Job stats:", 1)[1]
    rows = re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)
    return {m.group(1): int(m.group(2)) for m in rows if m.group(1) != "total"}
