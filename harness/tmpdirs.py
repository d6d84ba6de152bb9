"""The harness's temporary directories (``qio-*``), made so that none outlives its run.

Who makes one: :func:`harness.machine.short_socket_dir` (the sockets of a case, or of a
VM without one: the probe's), the plugin (the directory a session's processes share),
:func:`harness.binaries.probe` and the guest's KVM probe (their scratch). Each is named
after the process that made it, ``qio-[KIND-]PID-XXXXXXXX``, and each way one could
outlive its run has its remedy:

* its owner ends normally: the owner removes it (``Case.close``, a VM's shutdown, a
  ``with`` block);
* an exception comes between making it and handing it over (a SIGTERM's
  ``KeyboardInterrupt`` inside ``mkdtemp``, a ``--timeout``), or the owner never gets to
  its clean-up (an interrupted fixture set-up): when the process exits, every directory
  named after it goes (``atexit``), whether anyone remembered it or not;
* the process is killed outright (SIGKILL, the OOM killer, an xdist worker that crashed,
  or one xdist kills because it did not end within 10 s of the session's end), so no
  ``atexit`` runs: its QEMUs die with it (``PR_SET_PDEATHSIG``) and its directories are
  removed by :func:`sweep`, which the plugin runs at the start of every run and, in the
  xdist controller, at the end of the session: a directory whose process no longer
  exists is a leftover.

A directory is only ever removed by its own process, or by a sweep once that process is
gone (never one of another user, nor one of a process that still runs).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.processes import pid_alive

#: ``qio-`` [kind ``-``] pid ``-`` mkdtemp's 8 random characters
_NAME = re.compile(r"qio-(?:[a-z]+(?:-[a-z]+)*-)?(\d+)-[a-z0-9_]{8}")

#: Every parent directory this process made a directory in (for its exit).
_BASES: set[str] = set()


def make(kind: str = "", base: str | os.PathLike[str] | None = None) -> Path:
    """A new empty directory ``qio-[KIND-]PID-XXXXXXXX`` in ``base`` (default: TMPDIR)."""
    parent = str(base) if base is not None else tempfile.gettempdir()
    _BASES.add(parent)  # before it exists: nothing can come between
    prefix = f"qio-{kind}-" if kind else "qio-"
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


@contextlib.contextmanager
def temporary(kind: str = "", base: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """:func:`make`, removed when the block ends."""
    path = make(kind, base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owner(path: Path) -> int | None:
    """The pid a ``qio-*`` directory is named after (None: not one of ours)."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def own_dirs(pid: int | None = None) -> list[Path]:
    """The directories process ``pid`` (default: this one) made that still exist."""
    pid = os.getpid() if pid is None else pid
    found: list[Path] = []
    for base in sorted(_BASES):
        with contextlib.suppress(OSError):
            found += [p for p in Path(base).glob(f"qio-*{pid}-*") if owner(p) == pid]
    return found


def remove_own() -> None:
    """Remove every directory this process made (at its exit, whoever remembered them)."""
    for path in own_dirs():
        shutil.rmtree(path, ignore_errors=True)


def sweep(*bases: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``qio-*`` directories (of this user) whose process no longer exists,
    in ``bases`` (default: TMPDIR and ``/tmp``); returns what was removed."""
    parents = {str(b) for b in bases} or {tempfile.gettempdir(), "/tmp"}
    removed: list[Path] = []
    uid = os.getuid()
    for parent in sorted(parents):
        try:
            entries = list(Path(parent).glob("qio-*"))
        except OSError:
            continue
        for path in entries:
            pid = owner(path)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            try:
                if path.lstat().st_uid != uid or not path.is_dir() or path.is_symlink():
                    continue
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


atexit.register(remove_own)
