"""Fault injection through the real command line (``python -m ctvq`` in a subprocess): every fault ends in one
``ctvq <cmd>: error: ...`` line, exit status 2, no traceback, and nothing half-written where a result belongs.

Full and read-only disks are real: small tmpfs mounts (root only; skipped where mounting is not allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_helpers import write_config, write_data

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--threads", "1", "--no-tensorboard"]


def ctvq(*args: str | Path, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "ctvq", *map(str, args)], cwd=cwd, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=env)


def one_error_line(done: subprocess.CompletedProcess[str], command: str, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one error line, last (a config error lists its problems below it, one
    indented line each), holding every fragment; returns the error text."""
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"ctvq {command}: error: ")]
    assert len(starts) == 1, err[-3000:]
    assert all(line.startswith("  ") for line in lines[starts[0] + 1:]), err[-3000:]
    text = "\n".join(lines[starts[0]:])
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[object]:
    """``mount(name, size, read_only)``: a real tmpfs at ``tmp_path/name``, unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, size: str = "1m", read_only: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real full or read-only disk needs root and mount(8)")
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "p0.nii.gz"
    done = ctvq("phantom", "-o", path, "--shape", "64", "64", "24")
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, manifest) of the tiny training set-up."""
    folder = tmp_path_factory.mktemp("train")
    data = write_data(folder / "data", cases=4)
    return write_config(folder / "cfg.json", max_steps=2, i_save=1), data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# -- operating-system errors -------------------------------------------------------------------------------
def test_read_only_output_folder(scan: Path, training: tuple[Path, Path], mount) -> None:
    folder = mount("ro", read_only=True)
    one_error_line(ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", folder / "w.npz"),
                   "window", str(folder / "w.npz"), "read-only")
    config, data = training
    one_error_line(ctvq("train", "--config", config, "--data", data, "--output-dir", folder / "run",
                        *TRAIN_FLAGS), "train", "read-only")


def test_full_disk_while_preprocessing(scan: Path, mount) -> None:
    folder = mount("full", size="16k")
    target = folder / "w.npz"
    one_error_line(ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", target),
                   "window", str(target), "No space left on device", "free some space")
    assert not target.exists() and leftovers(folder) == []


def test_full_disk_while_saving_a_checkpoint(training: tuple[Path, Path], mount) -> None:
    """torch reports it as "enforce fail at inline_container.cc"; the user reads "No space left"."""
    folder = mount("full", size="200k")
    config, data = training
    done = ctvq("train", "--config", config, "--data", data, "--output-dir", folder / "run", *TRAIN_FLAGS)
    line = one_error_line(done, "train", "No space left on device", "free some space")
    assert "inline_container" not in done.stderr and ".pt" in line
    assert leftovers(folder) == []


def test_output_path_is_a_folder(scan: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    one_error_line(ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", tmp_path / "taken"),
                   "window", "is a folder, not a file")


def test_a_file_where_a_folder_of_the_path_should_be(scan: Path, training: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    one_error_line(ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", blocker / "w.npz"),
                   "window", f"{blocker} is a file, not a folder")
    config, data = training
    one_error_line(ctvq("train", "--config", config, "--data", data, "--output-dir", blocker, *TRAIN_FLAGS),
                   "train", "--output-dir names a file")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu(training: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = training
    one_error_line(ctvq("train", "--config", config, "--data", data, "--output-dir", tmp_path / "run",
                        "--device", "cuda", *TRAIN_FLAGS), "train", "--device cuda", "--device cpu")
    assert not (tmp_path / "run").exists()
    one_error_line(ctvq("eval", "--ckpt", tmp_path / "none.pt", "--data", data, "-o", tmp_path / "m.json",
                        "--device", "cuda:3"), "eval", "--device cuda:3")


def test_resolution_beyond_memory(scan: Path, tmp_path: Path) -> None:
    done = ctvq("window", scan, "--window", "lung", "--resolution", "100000", "-o", tmp_path / "w.npz")
    one_error_line(done, "window", "resolution 100000", "GiB", "use a resolution <=")


def test_stale_temporaries_of_a_killed_writer_are_removed(scan: Path, tmp_path: Path) -> None:
    """A writer killed with -9 leaves its hidden temporary folder; the next write of that target removes it
    (the folder is tagged with host and pid; a live writer's is never touched)."""
    import socket

    host = socket.gethostname().split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".w.npz.{host}-{dead}.{uuid.uuid4().hex[:8]}.tmp"
    stale.mkdir()
    (stale / "w.npz").write_bytes(b"partial")
    live = tmp_path / f".w.npz.{host}-{os.getpid()}.abc.tmp"
    live.mkdir()
    done = ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", tmp_path / "w.npz")
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and live.exists()


# -- resuming on other data --------------------------------------------------------------------------------
def test_resume_on_other_data_is_refused_then_allowed(training: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = training
    out = tmp_path / "run"
    done = ctvq("train", "--config", config, "--data", data, "--output-dir", out, *TRAIN_FLAGS)
    assert done.returncode == 0, done.stderr
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["num_cases"] == 4
    fewer = write_data(tmp_path / "fewer", cases=2)
    longer = write_config(tmp_path / "cfg.json", max_steps=4, i_save=1)
    one_error_line(ctvq("train", "--config", longer, "--data", fewer, "--output-dir", out, *TRAIN_FLAGS),
                   "train", "4 case(s)", "2 from", "2 removed (e.g. c2, c3)", "--allow-data-change")
    done = ctvq("train", "--config", longer, "--data", fewer, "--output-dir", out, "--allow-data-change",
                *TRAIN_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "StopIteration" not in done.stderr
    assert "warning: --allow-data-change" in (out / "log.txt").read_text()
    assert json.loads((out / "data.json").read_text())["num_cases"] == 2


# -- messages that must say what is wrong ------------------------------------------------------------------
def _bad_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one error line must say)."""
    import io
    import pickle

    import torch

    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    noise = folder / "noise.pt"
    noise.write_bytes(bytes(range(7, 250)) * 20)
    buffer = io.BytesIO()
    torch.save({"vae": {"w": torch.zeros(1000)}}, buffer)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(buffer.getvalue()[:1500])
    hostile = folder / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"vae": _Exploit()}, protocol=2))
    return {"empty": (empty, "empty file (0 bytes)"), "noise": (noise, "not a torch checkpoint"),
            "truncated": (truncated, "damaged or truncated torch archive"),
            "hostile": (hostile, "holds the Python object posix.system")}


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {ROOT / 'PWNED'}",))


@pytest.mark.parametrize("command", ["eval", "inspect-weights"])
def test_unreadable_checkpoints_are_named_for_what_they_are(tmp_path: Path, training: tuple[Path, Path],
                                                            command: str) -> None:
    _, data = training
    for path, says in _bad_checkpoints(tmp_path).values():
        args = (["--ckpt", path, "--data", data, "-o", tmp_path / "m.json"] if command == "eval" else [path])
        line = one_error_line(ctvq(command, *args), command, says)
        assert "weights_only=False" not in line and not line.endswith("()")
    assert not (ROOT / "PWNED").exists()


def test_edited_weights_file_is_reported_incomplete(tmp_path: Path) -> None:
    import torch

    from ctvq.models import SparseSDFVQVAE

    model = SparseSDFVQVAE(resolution=8, model_channels=32, latent_channels=4, num_blocks=1,
                           num_embeddings=16, num_head_channels=16, attn_mode="full")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.")}
    del state["decoder.blocks.0.mlp.mlp.0.weight"]
    path = tmp_path / "edited.pth"
    torch.save({"vae": state}, path)
    done = ctvq("inspect-weights", path)
    one_error_line(done, "inspect-weights", "decoder.blocks.0.mlp.mlp.0.weight")
    assert "layout: INCOMPLETE" in done.stdout and "matching configs in" in done.stdout


def test_other_model_size_is_a_short_message(training: tuple[Path, Path], tmp_path: Path) -> None:
    from train_helpers import write_stage1_checkpoint

    config, data = training
    stage1 = tmp_path / "s1.pt"
    write_stage1_checkpoint(stage1)
    bigger = write_config(tmp_path / "big.json", training_stage=2, pretrained_vae_path=str(stage1),
                          model_args={"model_channels": 64})
    done = ctvq("train", "--config", bigger, "--data", data, "--output-dir", tmp_path / "run", *TRAIN_FLAGS)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "checkpoint model_channels=32 but model model_channels=64" in done.stderr
    assert max(len(line) for line in done.stderr.splitlines()) < 1000


def test_intermediate_files_given_as_samples_say_which_step_is_missing(scan: Path, tmp_path: Path) -> None:
    windowed, band = tmp_path / "w.npz", tmp_path / "b.npz"
    assert ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", windowed).returncode == 0
    assert ctvq("sdf", windowed, "-o", band).returncode == 0
    one_error_line(ctvq("manifest", windowed, "-o", tmp_path / "m.csv"), "manifest",
                   "ctvq-windowed-volume file, not a training sample", "`ctvq sdf` and then `ctvq index`")
    one_error_line(ctvq("manifest", band, "-o", tmp_path / "m.csv"), "manifest", "run `ctvq index` on it")


# -- results that must not be silently wrong ---------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(training: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Final checkpoints of two stage-1 runs of the same size and codebook size, different seeds."""
    config, data = training
    folder = tmp_path_factory.mktemp("runs")
    finals = []
    for seed in (0, 1):
        cfg = write_config(folder / f"cfg{seed}.json", max_steps=2, i_save=2, seed=seed)
        done = ctvq("train", "--config", cfg, "--data", data, "--output-dir", folder / f"run{seed}",
                    *TRAIN_FLAGS)
        assert done.returncode == 0, done.stderr[-3000:]
        finals.append(folder / f"run{seed}" / "ckpts" / "final.pt")
    return finals[0], finals[1]


def test_tokens_decoded_with_another_checkpoint_are_refused(two_runs: tuple[Path, Path],
                                                           training: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    first, second = two_runs
    sample = training[1].parent / "c3.npz"
    tokens = tmp_path / "t.npz"
    assert ctvq("encode", "--ckpt", first, sample, "-o", tokens).returncode == 0
    one_error_line(ctvq("decode", "--ckpt", second, tokens, "-o", tmp_path / "r.ply"), "decode",
                   "encoded with another codebook", "--other-codebook")
    assert not (tmp_path / "r.ply").exists()


def test_tokens_outside_the_latent_grid_are_refused(two_runs: tuple[Path, Path], training: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    import numpy as np

    first, _ = two_runs
    tokens = tmp_path / "t.npz"
    assert ctvq("encode", "--ckpt", first, training[1].parent / "c3.npz", "-o", tokens).returncode == 0
    with np.load(tokens) as data:
        arrays = dict(data)
    arrays["latent_coords"] = arrays["latent_coords"].copy()
    arrays["latent_coords"][0] = (40, 0, 0)
    edited = tmp_path / "edited.npz"
    np.savez(edited, **arrays)
    one_error_line(ctvq("decode", "--ckpt", first, edited, "-o", tmp_path / "r.ply"), "decode",
                   "outside the 8^3 latent grid", "[40, 0, 0]")


def test_samples_with_nan_are_refused_naming_the_file(training: tuple[Path, Path], tmp_path: Path) -> None:
    import numpy as np

    from ctvq.ct.sample import load_sample

    config, data = training
    for key in ("sdf", "affine"):
        with np.load(data.parent / "c0.npz") as sample:
            arrays = dict(sample)
        if key == "sdf":  # version 4 stores the sdf as int16 steps (no NaN); version 3 as float32
            v4 = load_sample(data.parent / "c0.npz")
            del arrays["sdf_steps"], arrays["local_index"]
            arrays.update(format_version=np.asarray(3), coords=v4.coords, sdf=v4.sdf)
        arrays[key] = arrays[key].astype(np.float64)
        arrays[key].flat[0] = np.nan
        folder = tmp_path / key
        folder.mkdir()
        np.savez(folder / "bad.npz", **arrays)
        line = one_error_line(ctvq("manifest", folder / "bad.npz", "-o", folder / "m.csv"), "manifest",
                              "bad.npz", "NaN")
        assert not (folder / "m.csv").exists(), line
        one_error_line(ctvq("train", "--config", config, "--data", folder, "--output-dir", folder / "run",
                            *TRAIN_FLAGS), "train", "bad.npz", "NaN")


def test_a_sample_listed_twice_is_refused(training: tuple[Path, Path], tmp_path: Path) -> None:
    _, data = training
    sample = data.parent / "c0.npz"
    one_error_line(ctvq("manifest", sample, sample, "-o", tmp_path / "m.csv"), "manifest", "given twice")
    copy = tmp_path / "copy.npz"
    shutil.copy(sample, copy)
    one_error_line(ctvq("manifest", sample, copy, "-o", tmp_path / "m.csv"), "manifest",
                   "case 'c0'", "unique per window")


def test_a_duplicate_case_in_a_sample_folder_is_refused(training: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = training
    folder = tmp_path / "samples"
    folder.mkdir()
    for name in ("a.npz", "b.npz"):
        shutil.copy(data.parent / "c0.npz", folder / name)
    one_error_line(ctvq("train", "--config", config, "--data", folder, "--output-dir", tmp_path / "run",
                        *TRAIN_FLAGS), "train", "case id 'c0' names two samples")


def test_a_step_never_overwrites_its_input(scan: Path, tmp_path: Path) -> None:
    windowed = tmp_path / "w.npz"
    assert ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", windowed).returncode == 0
    before = windowed.read_bytes()
    one_error_line(ctvq("sdf", windowed, "-o", windowed), "sdf", "-o names the input itself")
    one_error_line(ctvq("sdf", windowed, "-o", tmp_path / "." / "w.npz"), "sdf", "-o names the input")
    assert windowed.read_bytes() == before


# -- config holes ------------------------------------------------------------------------------------------
def test_pretrained_path_flag_satisfies_the_stage_2_requirement(training: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    from train_helpers import write_stage1_checkpoint

    _, data = training
    stage1 = tmp_path / "s1.pt"
    write_stage1_checkpoint(stage1)
    config = write_config(tmp_path / "s2.json", training_stage=2, pretrained_vae_path=None, max_steps=1)
    done = ctvq("train", "--config", config, "--data", data, "--output-dir", tmp_path / "run",
                "--pretrained-vae-path", stage1, *TRAIN_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    one_error_line(ctvq("train", "--config", config, "--data", data, "--output-dir", tmp_path / "run2",
                        *TRAIN_FLAGS), "train", "pretrained_vae_path: required for training_stage 2")


# -- paths that escape their folder -----------------------------------------------------------------------
@pytest.mark.parametrize("crafted", ["../../escaped", "/tmp/escaped_abs"])
def test_crafted_case_ids_write_nothing_outside(scan: Path, two_runs: tuple[Path, Path],
                                                training: tuple[Path, Path], tmp_path: Path,
                                                crafted: str) -> None:
    from dataclasses import replace

    from ctvq.ct.sample import load_sample, save_sample

    out = tmp_path / "out"
    one_error_line(ctvq("window", scan, "--window", "lung", "--resolution", "64", "-o", out / "w.npz",
                        "--case-id", crafted), "window", "case id")
    samples = tmp_path / "samples"
    save_sample(replace(load_sample(training[1].parent / "c0.npz"), case_id=crafted), samples / "c0.npz")
    one_error_line(ctvq("eval", "--ckpt", two_runs[0], "--data", samples, "-o", out / "m.json",
                        "--output-dir", out / "eval"), "eval", "case id")
    escaped = Path(crafted if crafted.startswith("/") else (out / "eval" / crafted).resolve())
    assert not list(escaped.parent.glob(f"{escaped.name}*")) and not (out / "m.json").exists()


# -- config holes through the command line -----------------------------------------------------------------
BAD_CONFIGS = {
    "model_channels_100": ({"models.vqvae.args.model_channels": 100,
                            "models.vqvae.args.num_head_channels": 4}, "multiple of 16"),
    "rope_head_4": ({"models.vqvae.args.pe_mode": "rope", "models.vqvae.args.num_head_channels": 4},
                    "even number >= 6"),
    "mlp_ratio_0.001": ({"models.vqvae.args.mlp_ratio": 0.001}, "without a hidden channel"),
    "representation_config": ({"models.vqvae.args.representation_config": {"kind": "sdf"}}, "must be null"),
    "batch_split_above_batch": ({"trainer.args.batch_size_per_gpu": 1, "trainer.args.batch_split": 4},
                                "set batch_size_per_gpu to 4 and keep batch_split 4"),
    "models_renamed_model": ({"<rename>": ("models", "model")}, "did you mean 'models'"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configs_fail_before_any_work(name: str, training: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = training
    edits, says = BAD_CONFIGS[name]
    cfg = json.loads(config.read_text())
    for dotted, value in edits.items():
        if dotted == "<rename>":
            cfg[value[1]] = cfg.pop(value[0])
            continue
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value
    bad = tmp_path / f"{name}.json"
    bad.write_text(json.dumps(cfg))
    report = ctvq("validate-config", bad)  # a report on stdout, one block per file
    assert report.returncode == 2 and "Traceback" not in report.stderr + report.stdout
    assert f"invalid config {bad} (1 problem):" in report.stdout and says in report.stdout, report.stdout
    one_error_line(ctvq("train", "--config", bad, "--data", data, "--output-dir", tmp_path / "run",
                        *TRAIN_FLAGS), "train", says)
    assert not (tmp_path / "run").exists()


def test_a_manifest_mixing_windows_says_what_it_leaves_out(tmp_path: Path) -> None:
    import numpy as np
    from train_helpers import write_config as config_of
    from train_helpers import write_data as data_of

    data = data_of(tmp_path / "data", cases=3)
    for path in sorted(data.parent.glob("c*.npz"))[:1]:  # one case re-made as a bone sample
        with np.load(path) as sample:
            arrays = dict(sample)
        arrays["window"] = np.asarray("bone")
        arrays["window_width"], arrays["window_level"] = np.asarray(1500.0), np.asarray(300.0)
        np.savez(path.with_name("bone_" + path.name), **{**arrays, "case_id": np.asarray("b0")})
    mixed = tmp_path / "mixed.csv"
    samples = sorted(data.parent.glob("*.npz"))
    assert ctvq("manifest", *samples, "-o", mixed, "--split", "train=1").returncode == 0
    config = config_of(tmp_path / "cfg.json", max_steps=1)
    done = ctvq("train", "--config", config, "--data", mixed, "--output-dir", tmp_path / "run", *TRAIN_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 train case(s) used (0 filtered); rows of other windows left out: bone 1" in done.stdout
