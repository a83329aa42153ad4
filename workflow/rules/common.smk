# Config validation and the case table. Imported by every other rule file.
import re
import sys
from pathlib import Path

from snakemake.utils import validate

from ctvq.ct.band import default_band
from ctvq.ct.discover import discover_scans
from ctvq.ct.errors import CTInputError
from ctvq.ct.resources import preprocess_mem_mb, preprocess_runtime_minutes  # sizes of the preprocessing jobs

# The file the settings came from, for messages: --configfile's (given on the command line, it overrides the
# default keys of configs/pipeline.yaml) or the default.
CONFIG_FILE = (f"{workflow.overwrite_configfiles[-1]} (over configs/pipeline.yaml)"
               if workflow.overwrite_configfiles else "configs/pipeline.yaml")

if "experiment" in config:  # an older pipeline.yaml: the key named nothing and was never used
    raise ValueError(f"{CONFIG_FILE}: experiment: no longer a setting (it was never used); remove it. To keep "
                     "runs apart, give each its own `results:` folder, or use DVC experiments (`dvc exp run`)")
validate(config, schema="../schemas/pipeline.schema.yaml")


def _check_window_names() -> None:
    """Window names come from ctvq's registry (ctvq.ct.windows.WINDOWS), not from a list in the schema."""
    from ctvq.ct.windows import WINDOWS as REGISTRY

    band, resolution = config.get("band"), config["resolution"]
    named = {"windows": config["windows"], "train.windows": config["train"]["windows"],
             "resolution": list(resolution) if isinstance(resolution, dict) else [],
             "band": list(band) if isinstance(band, dict) else [], "surface": list(config.get("surface", {}))}
    for key, names in named.items():
        unknown = [name for name in names if name not in REGISTRY]
        if unknown:
            raise ValueError(f"{CONFIG_FILE}: {key}: {', '.join(map(repr, unknown))} is not a ctvq window; "
                             f"choose from {', '.join(REGISTRY)} (custom W/L: use `ctvq window` directly)")


_check_window_names()

# The interpreter running snakemake has ctvq installed: call the CLI through it, so no PATH set-up is needed
# (also inside SLURM jobs, which re-run this same interpreter).
CTVQ = f"{sys.executable} -m ctvq"
RESULTS = config["results"]
WINDOWS = config["windows"]


def _resolutions() -> dict[str, int]:
    """Each window's resolution: `resolution` is one number for all, or one per window naming them all (no
    default: the resolution decides what a window can resolve, e.g. bone at 512 beside lung at 64)."""
    given = config["resolution"]
    if not isinstance(given, dict):
        return {window: int(given) for window in WINDOWS}
    missing = [window for window in WINDOWS if window not in given]
    if missing:
        raise ValueError(f"{CONFIG_FILE}: resolution: no resolution for {', '.join(map(repr, missing))}; give "
                         "every window of `windows` one, or one number for all")
    return {window: int(given[window]) for window in WINDOWS}


RESOLUTION = _resolutions()


def resolution_of(wildcards) -> int:
    return RESOLUTION[wildcards.window]


def band_of(wildcards) -> float:
    """The band of a window: `band` is one number for all, or per window (ctvq's default for the rest)."""
    band = config["band"]
    return float(band) if isinstance(band, (int, float)) else float(band.get(wildcards.window,
                                                                             default_band(wildcards.window)))


def _scan_dir_cases(folder: str, taken: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Cases found by `ctvq discover`'s function (case -> path, case -> series UID); skips are reported."""
    try:
        found = discover_scans(folder)
    except CTInputError as exc:
        raise ValueError(f"{CONFIG_FILE}: inputs.scan_dir: {exc}") from None
    for case in found.cases:
        if case.case_id in taken:
            raise ValueError(f"{CONFIG_FILE}: inputs.scan_dir: {case.path} gives case id "
                             f"{case.case_id!r}, which {taken[case.case_id]} has already")
    if found.skipped:
        first, more = found.skipped[0], ", ..." if len(found.skipped) > 1 else ""
        print(f"ctvq workflow: inputs.scan_dir: {len(found.skipped)} path(s) skipped ({first.path}: "
              f"{first.reason}{more}); `ctvq discover {folder}` lists them", file=sys.stderr)
    return ({c.case_id: c.path for c in found.cases},
            {c.case_id: c.series_uid for c in found.cases if c.series_uid})


def _case_table() -> tuple[dict[str, str], dict[str, str]]:
    inputs = config["inputs"]
    cases = {f"phantom{i:02d}": f"{RESULTS}/raw/phantom{i:02d}.nii.gz" for i in range(inputs.get("phantoms", 0))}
    series = {}
    if inputs.get("scan_dir"):
        found, series = _scan_dir_cases(inputs["scan_dir"], cases)
        cases.update(found)
    for case, path in inputs.get("scans", {}).items():
        if case in cases:
            raise ValueError(f"{CONFIG_FILE}: inputs.scans: case id {case!r} is given twice")
        cases[case] = path
    if not cases:
        raise ValueError(f"{CONFIG_FILE}: inputs: no cases (set phantoms, scans or scan_dir)")
    return cases, series


CASES, SERIES = _case_table()  # SERIES: the DICOM series UID of a case whose folder holds several


def _train_settings() -> dict:
    """The train section, checked against the pipeline (windows, resolution) before any job runs.

    Training runs each config at its window's resolution (`ctvq train --resolution`, as --window and --band):
    the config must be valid there (e.g. its chunk_size must divide the latent grid)."""
    from ctvq.config import ConfigError, load_config, resolution_overrides

    train = config["train"]
    unknown = [w for w in train["windows"] if w not in WINDOWS]
    if unknown:
        raise ValueError(f"{CONFIG_FILE}: train.windows: {unknown} are not in windows {WINDOWS}")
    for key, stage in (("stage1_config", 1), ("stage2_config", 2)):
        for window in train["windows"]:
            try:
                cfg = load_config(train[key], resolution_overrides(RESOLUTION[window]))
            except ConfigError as exc:
                raise ValueError(f"{CONFIG_FILE}: train.{key} at the {window} window's resolution "
                                 f"{RESOLUTION[window]}: {exc}") from None
            if cfg.stage != stage:
                raise ValueError(f"{CONFIG_FILE}: train.{key}: {train[key]} is a stage-{cfg.stage} config")
    return train


TRAIN = _train_settings()


# mem_mb null: the job asks for what `ctvq plan` predicts for its config and manifest (+25 %). The plan rule
# writes it to a small JSON per window and stage, which the job's mem_mb reads once it exists (a dry run
# shows <TBD> before); Snakemake itself never imports torch.
PLAN_TRAIN = TRAIN["mem_mb"] is None
PLAN_EVAL = config["evaluate"]["mem_mb"] is None


EVAL_CHUNK = config["evaluate"]["chunk_size"]  # ctvq eval --chunk-size, and what stage 2's plan assumes
EVAL_CHUNK_ARG = f" --chunk-size {EVAL_CHUNK}" if EVAL_CHUNK else ""
PLAN_EVAL_CHUNK_ARG = f" --eval-chunk-size {EVAL_CHUNK}" if EVAL_CHUNK else ""


def plan_file(stage: int) -> str:
    return f"{RESULTS}/train/{{window}}/plan/stage{stage}.json"


def plan_input(stage: int, wanted: bool) -> dict[str, str]:
    """The plan JSON as a job's `plan` input when its mem_mb is planned, else nothing."""
    return {"plan": plan_file(stage)} if wanted else {}


def planned_mem_mb(key: str, fixed: int | None):
    """A job's mem_mb: the fixed number, or ctvq plan's request ``key`` read from the job's plan input."""
    if fixed is not None:
        return fixed

    def mem_mb(wildcards, input):
        import json

        return int(json.loads(Path(input.plan).read_text())[key])

    return mem_mb


def _split_settings() -> tuple[str, list[str]]:
    """`ctvq manifest` split options from the split section (checked now), and the split file as input."""
    from shlex import quote

    from ctvq.ct.splits import SplitError, check_fractions

    split = config["split"]
    if split["file"]:
        if not Path(split["file"]).is_file():
            raise ValueError(f"{CONFIG_FILE}: split.file: {split['file']!r} is not a file; give a CSV "
                             "with columns case_id,split or set file: null to split by hash")
        return f"--split-file {quote(split['file'])}", [split["file"]]
    try:
        fractions = check_fractions(split["fractions"], f"{CONFIG_FILE}: split.fractions")
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
    case="|".join(re.escape(c) for c in sorted(CASES)),
    window="|".join(WINDOWS),
    stage="1|2",


def _train_launcher(wildcards, resources):
    """`python -m ctvq train` for 0-1 GPUs, torchrun with one process per GPU beyond that."""
    if resources.gpu > 1:
        return f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {resources.gpu} -m ctvq"
    return CTVQ
