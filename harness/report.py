"""Failure reports that read like bug reports instead of a wall of harness traceback.

A harness error already says what went wrong (diff, command line, status, log tail); the
only traceback lines worth showing are the case's own, which say where in the scenario.
The same facts feed the CI reports (``harness.ghactions``, ``harness.artifacts``): the
case's line for an annotation, a one-line reason for a summary table, and, for an oracle
failure, a drawing of the disk (``harness.svg``) saved beside the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import svg
from harness.errors import OracleFailure

#: the oracle's drawing, in the failed test's scratch dir (and so in its artifacts)
ORACLE_SVG = "oracle.svg"
REASON_MAX = 200


def _case_entries(excinfo: Any, case_file: Path) -> list[Any]:
    return [e for e in excinfo.traceback if Path(str(e.path)) == case_file]


def harness_failure_report(excinfo: Any, case_file: Path) -> str:
    """The case's frames (file:line: source) followed by the error's own message."""
    lines = []
    for entry in _case_entries(excinfo, case_file):
        src = str(entry.statement).strip().splitlines()
        lines.append(f"{case_file.name}:{entry.lineno + 1}: {src[0] if src else ''}")
    name = type(excinfo.value).__name__
    lines.append(f"{name}: {excinfo.value}")
    return "\n".join(lines)


def failure_line(excinfo: Any, case_file: Path, def_line: int) -> int:
    """The 1-based line of the case where it failed: its deepest frame in the case file,
    else ``def_line`` (a golden mismatch, found after the body returned, has none)."""
    entries = _case_entries(excinfo, case_file) if excinfo is not None else []
    return entries[-1].lineno + 1 if entries else def_line


def one_line(text: str, limit: int = REASON_MAX) -> str:
    """The first non-empty line of ``text``, cut at ``limit`` characters."""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def failure_reason(excinfo: Any) -> str:
    """``ExceptionName: first line of its message``: the reason a summary table shows."""
    return one_line(f"{type(excinfo.value).__name__}: {excinfo.value}")


def draw_oracle_failure(excinfo: Any, scratch: Path | None, title: str) -> Path | None:
    """For an oracle failure that carries verdicts, write the SVG strip into the scratch
    dir and return its path (None for any other failure, or when it cannot be written:
    a drawing must never hide the failure it illustrates)."""
    exc = excinfo.value
    if scratch is None or not isinstance(exc, OracleFailure) or not exc.verdicts:
        return None
    try:
        return svg.write(scratch / ORACLE_SVG, exc.verdicts, title)
    except OSError:
        return None
