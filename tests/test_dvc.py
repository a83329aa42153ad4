"""DVC over the Snakemake stages, for real, in real git clones of the project: a fresh clone is a DVC repo;
repro, no-op repeat, push/pull round trip, params/metrics/plots across commits and an experiment."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(repo: Path, *cmd: str) -> str:
    identity = {f"GIT_{who}_{what}": "ctvq" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")}
    env = {**os.environ, **identity, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout + done.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _all_skipped(output: str) -> bool:
    stages = ("preprocess", "train@lung", "evaluate@lung")
    return all(f"Stage '{s}' didn't change, skipping" in output for s in stages)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A real `git clone` of the project (its committed state: dvc.yaml, .dvc/, .gitignore, the code), with
    the demo made tiny and committed."""
    repo = tmp_path / "project"
    _run(tmp_path, "git", "clone", "-q", str(_git_root()), str(repo))
    config = yaml.safe_load((repo / "configs" / "pipeline.yaml").read_text())
    config.update(inputs={"phantoms": 2}, windows=["lung"], resolution=64)
    config["train"].update(max_steps=2, threads=1)
    config["evaluate"] = {"allow_collapse": True}  # 2-3 steps learn no surface; this test is about DVC
    (repo / "configs" / "pipeline.yaml").write_text(yaml.safe_dump(config))
    _run(repo, "git", "commit", "-qam", "tiny demo")
    return repo


def _git_root() -> Path:
    found = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip("not run from a git checkout")
    return Path(found.stdout.strip())


def test_fresh_git_clone_is_a_dvc_repository(tmp_path: Path) -> None:
    """A plain `git clone` (of what is committed) is a DVC repository: dvc dag and dvc status work there."""
    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(_git_root()), str(clone))
    tracked = _run(clone, "git", "ls-files", ".dvc", ".dvcignore", "data").split()
    committed = {".dvc/config", ".dvc/.gitignore", ".dvcignore", "data/README.md", "data/raw/.gitkeep"}
    assert committed <= set(tracked)
    local = (".dvc/cache", ".dvc/tmp", ".dvc/config.local")
    assert _run(clone, "git", "check-ignore", *local).split() == list(local)
    assert not (clone / ".dvc" / "cache").exists()
    dag = _run(clone, "dvc", "dag")
    status = _run(clone, "dvc", "status")
    for output in (dag, status):
        assert "not inside of a DVC repository" not in output
        assert all(stage in output for stage in ("preprocess", "train", "evaluate"))


def test_repro_noop_push_pull_round_trip_and_param_rerun(repo: Path, tmp_path: Path) -> None:
    _run(repo, "dvc", "repro")
    assert (repo / "results" / "manifests" / "lung.csv").exists()
    assert (repo / "results" / "train" / "lung" / "stage2" / "ckpts" / "final.pt").exists()
    shown = _run(repo, "dvc", "metrics", "show")
    # (null metrics, e.g. Chamfer of a 2-step model without a surface, are not shown by dvc)
    assert "num_cases" in shown and "val/num_cases" in shown and "val/occupancy_iou" in shown
    again = _run(repo, "dvc", "repro")
    assert _all_skipped(again)

    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "run")  # dvc.lock
    _run(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    _run(repo, "dvc", "push")
    before = _digests(repo / "results")
    for out in ("raw", "previews", "samples", "manifests", "train", "eval"):
        shutil.rmtree(repo / "results" / out)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(repo, "dvc", "pull")
    assert _digests(repo / "results") == before
    after_pull = _run(repo, "dvc", "repro")
    assert _all_skipped(after_pull)

    params = _run(repo, "dvc", "params", "diff", "--all")  # the training JSONs are params files
    assert "configs/vqvae/tiny_stage2.json" in params and "trainer.args.optimizer.args.lr" in params
    lr = "configs/vqvae/tiny_stage2.json:trainer.args.optimizer.args.lr=0.002"
    exp = _run(repo, "dvc", "exp", "run", "-S", lr)
    assert "Stage 'preprocess' didn't change, skipping" in exp
    assert "Running stage 'train@lung'" in exp and "Running stage 'evaluate@lung'" in exp
    diff = _run(repo, "dvc", "metrics", "diff", "--all", "--md")  # HEAD's metrics come from the cache
    row = next(line for line in diff.splitlines() if "val/num_cases" in line)
    assert row.split("|")[3].strip() == row.split("|")[4].strip() == "1", diff
    table = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    assert "!" not in json.dumps(table)
    plots = json.loads(_run(repo, "dvc", "plots", "show", "--json"))
    fields = {v.get("field") for entry in plots["data"].values() for p in entry
              for v in p["content"]["data"]["values"]}
    assert {"loss", "usage"} <= fields, fields
