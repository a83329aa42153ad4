"""Case ids become file names (samples, figures, meshes, tokens), so an id must be one plain name.

``../../x`` or ``/tmp/x`` as a case id would make every writer put files outside its output folder. Ids given
by the user are refused; ids derived from file names are made safe instead (a scan called ``my scan.nii.gz``
should still work).
"""

from __future__ import annotations

import re

_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def case_id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name a file, or None when it can."""
    if not isinstance(case_id, str) or not case_id:
        return "it is empty"
    if _ALLOWED.fullmatch(case_id) is None:
        return ("a case id is one file name of letters, digits, '.', '_' and '-', starting with a letter or "
                "digit, at most 200 characters (no '/', '..' or spaces)")
    return None


def check_case_id(case_id: str, where: str) -> str:
    """``case_id`` itself, or ValueError naming ``where`` (a flag or a file) and the rule."""
    problem = case_id_problem(case_id)
    if problem is not None:
        raise ValueError(f"{where}: case id {case_id!r} is refused: {problem}")
    return case_id


def safe_case_id(name: str) -> str:
    """A valid case id made from a file name: runs of other characters become '_', leading dots go."""
    safe = _UNSAFE.sub("_", name).lstrip("._-")[:200]
    return safe or "case"


__all__ = ["case_id_problem", "check_case_id", "safe_case_id"]
