"""harness.tmpdirs: no ``qio-*`` directory outlives its run, whichever way the run ends
(issue 9, item 7 and the directories that leaked during loaded runs).

Each way a directory could be left has its test: an interruption between making it and
handing it over, a process killed outright (an xdist worker that crashed, or one xdist
killed because it did not end within 10 s of the session's end). The end-to-end ones run
a throwaway project with TMPDIR pointing to a directory of their own, so every ``qio-*``
directory the run makes lands where they can look.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import tmpdirs
from tests.conftest import START_VM, Project, qio_dirs, wait_gone

#: a bound for hangs, not a speed requirement
BOUND = 120


def child(code: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with TMPDIR=tmpdir; its output."""
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=BOUND, check=False)


def test_names_say_whose_they_are(tmp_path: Path) -> None:
    d = tmpdirs.make(base=tmp_path)
    s = tmpdirs.make("session", tmp_path)
    assert d.name.startswith(f"qio-{os.getpid()}-") and d.is_dir()
    assert s.name.startswith(f"qio-session-{os.getpid()}-")
    assert tmpdirs.owner(d) == tmpdirs.owner(s) == os.getpid()
    assert tmpdirs.owner(tmp_path / "qio-abcdefgh") is None  # an older harness's: not ours
    assert sorted(tmpdirs.own_dirs()) >= sorted([d, s])
    with tmpdirs.temporary("probe", tmp_path) as p:
        assert p.is_dir()
    assert not p.exists()


def test_interrupted_while_it_is_made_it_goes_at_the_exit(short_tmpdir: Path) -> None:
    """A SIGTERM's KeyboardInterrupt (or a --timeout) after mkdtemp made the directory but
    before the caller got it: nobody could remember it, the exit removes it by its name."""
    cp = child("""
        import tempfile
        from harness import machine

        real = tempfile.mkdtemp

        def interrupted(*args, **kw):
            made = real(*args, **kw)
            print("made", made, flush=True)
            raise KeyboardInterrupt("SIGTERM")

        tempfile.mkdtemp = interrupted
        machine.short_socket_dir()
    """, short_tmpdir)
    assert "KeyboardInterrupt" in cp.stderr and "made" in cp.stdout, cp
    assert qio_dirs(short_tmpdir) == []


def test_a_killed_process_leaves_them_to_the_next_sweep(short_tmpdir: Path) -> None:
    """SIGKILL (the OOM killer, xdist killing a worker): no atexit; the sweep removes the
    directories of a process that is gone, never those of one that runs."""
    cp = child("""
        import os, signal
        from harness import machine, tmpdirs
        machine.short_socket_dir()
        tmpdirs.make("session")
        os.kill(os.getpid(), signal.SIGKILL)
    """, short_tmpdir)
    assert cp.returncode == -signal.SIGKILL
    left = qio_dirs(short_tmpdir)
    assert len(left) == 2, left
    mine = tmpdirs.make(base=short_tmpdir)
    stranger = short_tmpdir / "qio-abcdefgh"  # no pid in its name: never touched
    stranger.mkdir()
    removed = tmpdirs.sweep(short_tmpdir)
    assert sorted(p.name for p in removed) == left
    assert qio_dirs(short_tmpdir) == sorted([mine.name, stranger.name])


CRASHES = START_VM + '''

def test_worker_crashes(qio: Case) -> None:
    start(qio, "crashes")
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would


def test_worker_hangs_at_its_exit(qio: Case) -> None:
    """xdist waits 10 s for a worker to end after the session, then kills it: under load a
    worker still stopping its QEMUs was killed before its own clean-up (atexit) ran."""
    import atexit

    start(qio, "hangs")
    atexit.register(time.sleep, 60)  # runs before the harness's own atexit (LIFO)
'''


@pytest.mark.parametrize("test", ["test_worker_crashes", "test_worker_hangs_at_its_exit"])
def test_a_killed_xdist_worker_leaves_no_directory(project: Project, short_tmpdir: Path,
                                                   test: str) -> None:
    project.case("crashes", CRASHES)
    result = project.run("-n", "1", "-k", test, timeout=BOUND + 60)
    out = result.stdout.str() + result.stderr.str()
    if test == "test_worker_crashes":
        assert "crashed while running" in out, out
    pids = project.pids()
    assert len(pids) == 1 and all(wait_gone(pid) for pid in pids.values()), pids
    assert qio_dirs(short_tmpdir) == [], out
