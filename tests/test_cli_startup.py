"""Commands that need no model must not import torch (seconds of CPU and ~0.5 GB per preprocessing call).

Each check runs in a fresh interpreter: the test process itself has torch loaded by other tests.
Wall-time numbers live in ``bench/startup.py``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
from ctvq.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def _python(*args: str) -> str:
    """The last stdout line of a fresh ``python <args>`` run from the repository root."""
    # utf-8 explicitly: a DICOM write (GDCM) earlier in the same pytest process can leave the C locale behind
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, encoding="utf-8",
                          timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


def _probe(*argvs: list[str]) -> dict:
    return json.loads(_python("-c", _PROBE, json.dumps(argvs)))


LIGHT = [["--help"], ["window", "--help"], ["index", "--help"], ["manifest", "--help"], ["sdf", "--help"],
         ["phantom", "--help"], ["validate-config", str(ROOT / "configs" / "vqvae" / "stage1.json")]]


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    result = _probe(argv)
    assert result == {"codes": [0], "torch": False}


def test_preprocessing_chain_runs_without_torch(tmp_path: Path) -> None:
    scan, windowed, band, sample = (str(tmp_path / n) for n in ("p.nrrd", "w.npz", "b.npz", "s.npz"))
    result = _probe(["phantom", "-o", scan, "--shape", "64", "64", "24"],
                    ["window", scan, "-o", windowed, "--window", "bone", "--resolution", "64"],
                    ["sdf", windowed, "-o", band], ["index", band, "-o", sample],
                    ["manifest", sample, "-o", str(tmp_path / "manifest.csv"), "--min-points", "1"])
    assert result == {"codes": [0, 0, 0, 0, 0], "torch": False}


def test_library_modules_do_not_import_the_cli() -> None:
    """The CLI imports the library, never the reverse (which made every library import load every command)."""
    code = ("import sys, ctvq.ct.steps, ctvq.ct.demo, ctvq.data, ctvq.ct.sample, ctvq.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ctvq.cli')))")
    assert _python("-c", code) == "[]"


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    assert _python("-m", "ctvq", "--version") == f"ctvq {version('ctvq')}"


def test_model_commands_import_their_module_only_when_dispatched() -> None:
    code = ("import sys\nfrom ctvq.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, 'ctvq.cli.eval' in sys.modules)")
    assert _python("-c", code) == "True False"
