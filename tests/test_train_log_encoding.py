"""The run's text files are UTF-8 whatever the process locale: a library call can leave the C locale behind
mid-run (GDCM's DICOM writer does; ctvq.ct.io restores it after its own writes), where the default encoding is
ASCII and "mm³" in a log line would crash."""

from __future__ import annotations

import io
import locale
from pathlib import Path

import pytest

from ctvq.train.progress import RunLog


@pytest.fixture()
def c_locale():
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        locale.setlocale(locale.LC_CTYPE, before)
        pytest.skip("this Python runs in UTF-8 mode: the C locale does not change the default encoding")
    yield
    locale.setlocale(locale.LC_CTYPE, before)


def test_the_training_log_is_utf8_under_the_c_locale(tmp_path: Path, c_locale) -> None:
    log = RunLog(tmp_path, enabled=True, start_step=0, tensorboard=False, stream=io.StringIO())
    log.text("islands < 5 mm³ removed")
    assert "5 mm³" in (tmp_path / "log.txt").read_text(encoding="utf-8")
