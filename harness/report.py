"""Failure reports that read like bug reports instead of a wall of harness traceback.

A harness error already says what went wrong (diff, command line, status, log tail); the
only traceback lines worth showing are the case's own, which say where in the scenario.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def harness_failure_report(excinfo: Any, case_file: Path) -> str:
    """The case's frames (file:line: source) followed by the error's own message."""
    lines = []
    for entry in excinfo.traceback:
        if Path(str(entry.path)) == case_file:
            src = str(entry.statement).strip().splitlines()
            lines.append(f"{case_file.name}:{entry.lineno + 1}: {src[0] if src else ''}")
    name = type(excinfo.value).__name__
    lines.append(f"{name}: {excinfo.value}")
    return "\n".join(lines)
