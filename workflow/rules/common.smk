# Config validation and the case table. Imported by every other rule file.
import sys
from pathlib import Path

from snakemake.utils import validate

from ctvq.ct.resources import preprocess_mem_mb  # the preprocessing rules size their memory with it

validate(config, schema="../schemas/pipeline.schema.yaml")

# The interpreter running snakemake has ctvq installed: call the CLI through it, so no PATH set-up is needed
# (also inside SLURM jobs, which re-run this same interpreter).
CTVQ = f"{sys.executable} -m ctvq"
RESULTS = config["results"]
WINDOWS = config["windows"]
SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _discover_scans(folder: str) -> dict[str, str]:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"configs/pipeline.yaml: inputs.scan_dir: {folder!r} is not a folder")
    found = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        suffix = next((s for s in SCAN_SUFFIXES if name.endswith(s)), None)
        if entry.is_file() and suffix:
            found[name[: -len(suffix)]] = str(entry)
        elif entry.is_dir() and any(p.suffix.lower() in ("", ".dcm") for p in entry.iterdir() if p.is_file()):
            found[name] = str(entry)
    return found


def _case_table() -> dict[str, str]:
    inputs = config["inputs"]
    cases = {f"phantom{i:02d}": f"{RESULTS}/raw/phantom{i:02d}.nii.gz" for i in range(inputs.get("phantoms", 0))}
    if inputs.get("scan_dir"):
        cases.update(_discover_scans(inputs["scan_dir"]))
    for case, path in inputs.get("scans", {}).items():
        if case in cases:
            raise ValueError(f"configs/pipeline.yaml: inputs.scans: case id {case!r} is given twice")
        cases[case] = path
    if not cases:
        raise ValueError("configs/pipeline.yaml: inputs: no cases (set phantoms, scans or scan_dir)")
    return cases


CASES = _case_table()


def _train_settings() -> dict:
    """The train section, checked against the pipeline (windows, resolution) before any job runs."""
    from ctvq.config import load_config

    train = config["train"]
    unknown = [w for w in train["windows"] if w not in WINDOWS]
    if unknown:
        raise ValueError(f"configs/pipeline.yaml: train.windows: {unknown} are not in windows {WINDOWS}")
    for key in ("stage1_config", "stage2_config"):
        cfg = load_config(train[key])
        if cfg.dataset.resolution != config["resolution"]:
            raise ValueError(
                f"configs/pipeline.yaml: train.{key}: {train[key]} trains at dataset.args.resolution "
                f"{cfg.dataset.resolution} but the pipeline preprocesses at resolution {config['resolution']}; "
                "make them equal")
        if cfg.stage != int(key[5]):
            raise ValueError(f"configs/pipeline.yaml: train.{key}: {train[key]} is a stage-{cfg.stage} config")
    return train


TRAIN = _train_settings()


def _split_settings() -> tuple[str, list[str]]:
    """`ctvq manifest` split options from the split section (checked now), and the split file as input."""
    from shlex import quote

    from ctvq.ct.splits import SplitError, check_fractions

    split = config["split"]
    if split["file"]:
        if not Path(split["file"]).is_file():
            raise ValueError(f"configs/pipeline.yaml: split.file: {split['file']!r} is not a file; give a CSV "
                             "with columns case_id,split or set file: null to split by hash")
        return f"--split-file {quote(split['file'])}", [split["file"]]
    try:
        fractions = check_fractions(split["fractions"], "configs/pipeline.yaml: split.fractions")
    except SplitError as exc:
        raise ValueError(str(exc).replace("e.g. --split ", "e.g. ")) from None
    text = ",".join(f"{name}={value!r}" for name, value in fractions.items())
    return f"--split {text} --split-seed {split['seed']}", []


SPLIT_ARGS, SPLIT_FILES = _split_settings()


def _surface_args() -> dict[str, str]:
    """`ctvq window` surface flags per window from the surface section (keys left out: ctvq's defaults)."""
    flags = {"smooth_mm": "--smooth-mm", "min_island_mm3": "--min-island-mm3", "pad": "--pad"}
    args = {}
    for window in WINDOWS:
        given = config.get("surface", {}).get(window, {})
        parts = [f"{flags[k]} {given[k]}" for k in flags if k in given]
        if "body_mask" in given:
            parts.append("--body-mask" if given["body_mask"] else "--no-body-mask")
        args[window] = " ".join(parts)
    return args


SURFACE_ARGS = _surface_args()


wildcard_constraints:
    case="|".join(sorted(CASES)),
    window="|".join(WINDOWS),
