"""``--artifacts DIR``: what a CI job uploads for each failing test, and nothing else.

A failed test's scratch dir holds everything needed to read the failure, but also its
images (hundreds of MiB across a suite) and lives under pytest's tmp dir, whose path
differs per worker and run. So each failing test gets ``DIR/<test id>/`` with copies of
the small, readable files: the actual transcript (``NAME.out.actual``) and its diff
(``NAME.out.diff``), QEMU's logs (``VM.log``), the QMP traffic (``VM.qmp.log``),
``tools.log``, the oracle's drawing (``oracle.svg``), and ``failure.txt`` (the report
text). Passing tests write nothing, not even ``DIR``. Each test writes only its own
directory, so ``-n`` workers never share a file.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

#: the scratch files worth uploading (top level only: images and sockets stay behind)
PATTERNS = ("*.out.actual", "*.out.diff", "*.log", "*.svg")
FAILURE_TXT = "failure.txt"
NAME_MAX = 120


def dir_name(nodeid: str) -> str:
    """A directory name for a test id, readable and safe on any filesystem:
    ``cases/test_255.py::test_x[a-b]`` -> ``cases-test_255.py--test_x-a-b``; a long id
    keeps a hash of the whole so two ids never share a directory."""
    name = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", nodeid.replace("::", "--")).strip("-.")
    if len(name) > NAME_MAX:
        name = name[:NAME_MAX] + "-" + hashlib.sha1(nodeid.encode()).hexdigest()[:10]
    return name or "test"


def failure_text(nodeid: str, phases: Sequence[tuple[str, str]], scratch: Path | None) -> str:
    """``failure.txt``: which test, where its scratch dir is, and each failed phase's
    report as pytest printed it (``phases``: (when, text) pairs)."""
    lines = [f"test: {nodeid}"]
    if scratch is not None:
        lines.append(f"scratch: {scratch}")
    for when, text in phases:
        lines += ["", f"--- {when} ---", text.rstrip()]
    return "\n".join(lines) + "\n"


def collect(root: Path, nodeid: str, scratch: Path | None,
            phases: Sequence[tuple[str, str]]) -> Path:
    """Copy one failing test's files into ``root/<dir_name(nodeid)>``; returns that dir.

    A directory left by an earlier run of the same test is replaced, so what is there
    always belongs to this run.
    """
    dest = root / dir_name(nodeid)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if scratch is not None and scratch.is_dir():
        for pattern in PATTERNS:
            for src in sorted(scratch.glob(pattern)):
                if src.is_file():
                    shutil.copy2(src, dest / src.name)
    (dest / FAILURE_TXT).write_text(failure_text(nodeid, phases, scratch), encoding="utf-8")
    return dest
