"""The bisect driver on a synthetic QEMU history, with the installed QEMU doing the work.

Each test makes a git repo standing in for a QEMU tree. Its "build" (``build.py``, given
to the driver as the replaceable build command) writes wrapper scripts around the
installed programs into the build dir; ``settings.json`` in each commit says how that
commit's "QEMU" misbehaves:

* ``store_bug``: the qemu-system wrapper slips a ``blkdebug`` filter under every qcow2
  node that fails writes to the image header, so the persistent bitmap is never stored at
  close (QEMU itself runs the scenario; only the stored result is wrong);
  ``store_bug_every: N`` does so only on every Nth VM launch since the build (a bug that
  shows only sometimes);
* ``build_error``: the build prints a compiler error and fails;
* ``no_start``: qemu-system exits at once, so no QEMU starts at all (harness breakage
  from the bisect's point of view);
* ``create_fails_every: N``: every Nth ``qemu-img create`` fails (an unrelated flake);
* ``slow_build``: the build waits, so a test can interrupt the bisect during a step.

The project under test is a tiny qiotests project (the real pyproject.toml) with one
case that stores a bitmap and logs what ``qemu-img info`` finds, and a golden file made
with ``--regen`` against the installed QEMU. The other tests feed hand-written JUnit
reports to the classification, which is logic of ours, not QEMU's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from harness import bisect as bs
from harness import cli, processes
from harness.errors import ConfigError
from tests.conftest import CHILD_REPORT, REPO, child_report

BUILD_PY = r'''#!/usr/bin/env python3
"""Synthetic QEMU build: wrappers around the installed programs, per settings.json."""
import json, os, pathlib, sys, time
src, build = map(pathlib.Path, sys.argv[1:3])
settings = json.loads((src / "settings.json").read_text())
if settings.get("build_error"):
    print("block/dirty-bitmap.c:160:5: error: expected ';' before '}' token", file=sys.stderr)
    sys.exit(1)
build.mkdir(parents=True, exist_ok=True)
if settings.get("slow_build"):
    (build / "building").write_text(str(os.getpid()))
    time.sleep(120)
for counter in build.glob("*.count"):
    counter.unlink()
(build / "storage-daemon").mkdir(exist_ok=True)
for name in ("qemu-io", "qemu-nbd", "storage-daemon/qemu-storage-daemon"):
    path = build / name
    path.write_text(f'#!/bin/sh\nexec /usr/bin/{pathlib.Path(name).name} "$@"\n')
    path.chmod(0o755)
for name in ("qemu-system-x86_64", "qemu-img"):
    path = build / name
    path.write_text(f"#!{sys.executable}\nSETTINGS = {settings!r}\nREAL = '/usr/bin/{name}'\n"
                    + (src / "wrapper.py").read_text())
    path.chmod(0o755)
print("built", build)
'''

WRAPPER_PY = r'''
import json, os, sys
args = sys.argv[1:]
here = os.path.dirname(os.path.abspath(__file__))

def nth(name, every):
    """True on every `every`th call counted in the build dir."""
    path = os.path.join(here, name + ".count")
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    return n % every == 0

if REAL.endswith("qemu-img"):
    every = SETTINGS.get("create_fails_every")
    if every and args[:1] == ["create"] and nth("create", every):
        print("qemu-img: synthetic flake", file=sys.stderr)
        sys.exit(1)
elif SETTINGS.get("no_start"):
    print("qemu-system-x86_64: synthetic: cannot start", file=sys.stderr)
    sys.exit(1)
elif "-blockdev" in args and (SETTINGS.get("store_bug") or (
        SETTINGS.get("store_bug_every") and nth("launch", SETTINGS["store_bug_every"]))):
    out = []
    for prev, arg in zip(["", *args], args):
        if prev == "-blockdev" and arg.startswith("{"):
            node = json.loads(arg)
            if node.get("driver") == "qcow2" and isinstance(node.get("file"), dict):
                node["file"] = {"driver": "blkdebug", "image": node["file"], "inject-error": [
                    {"event": "pwritev", "iotype": "write", "errno": 5, "sector": 0}]}
            arg = json.dumps(node)
        out.append(arg)
    args = out
os.execv(REAL, [REAL, *args])
'''

CASE = '''
from harness.block import blockdev, qcow2_node
from harness.session import Case


def test_bitmap_stored(qio: Case) -> None:
    """A persistent bitmap added at run time is in the image after a clean shutdown."""
    qio.img.create("disk.qcow2", 16 << 20)
    vm = qio.vm("vm0", args=blockdev(qcow2_node(qio.path("disk.qcow2"), "drive0")),
                machine_type="none")
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="b0", persistent=True)
    vm.qemu_io("drive0", "write 0 64k")
    vm.shutdown()
    for b in qio.img.bitmaps(qio.path("disk.qcow2")):
        qio.log.log(f"stored: {b['name']} flags={','.join(b['flags'])}")


def test_image_info(qio: Case) -> None:
    """Not touched by any synthetic bug: passes at BAD, so the steps leave it out."""
    qio.img.create("disk.qcow2", 16 << 20)
    assert qio.img.info(qio.path("disk.qcow2"))["format"] == "qcow2"
'''

# what --regen wrote against Debian's QEMU 7.2 (read: the bitmap is stored, not in use)
GOLDEN = ("=== test_bitmap_stored ===\n"
          "oracle (before shutdown of vm0): drive0/b0: complete, dirty [0x0+0x10000]\n"
          "oracle (disk.qcow2 after shutdown of vm0): drive0/b0: complete, dirty [0x0+0x10000]\n"
          "stored: b0 flags=auto\n"
          "oracle verdict: 2 bitmap check(s), all passed\n")
BUILD_CMD = [sys.executable, "{src}/build.py", "{src}", "{build}"]


class Synth:
    """The synthetic QEMU repo: one commit per call of :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        (path / "build.py").write_text(BUILD_PY)
        (path / "wrapper.py").write_text(WRAPPER_PY)
        self.git("init", "-q", "-b", "master")
        self.git("config", "user.name", "t")
        self.git("config", "user.email", "t@example.invalid")
        self.shas: list[str] = []

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    def commit(self, subject: str, **settings: Any) -> str:
        (self.path / "settings.json").write_text(json.dumps(settings) + "\n")
        (self.path / "HISTORY").write_text(f"{len(self.shas)} {subject}\n")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", subject)
        self.shas.append(self.git("rev-parse", "HEAD"))
        return self.shas[-1]

    def assert_untouched(self) -> None:
        """Back on master, no bisect in progress, no local change."""
        assert self.git("symbolic-ref", "HEAD") == "refs/heads/master"
        assert not (self.path / ".git" / "BISECT_START").exists()
        assert self.git("status", "--porcelain") == ""


@pytest.fixture
def synth(tmp_path: Path) -> Synth:
    return Synth(tmp_path / "qemu")


@pytest.fixture
def project(tmp_path: Path, qemu_system: str) -> Path:
    root = tmp_path / "project"
    (root / "cases").mkdir(parents=True)
    (root / "expected").mkdir()
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (root / "cases" / "__init__.py").write_text("")
    (root / "cases" / "test_store.py").write_text(textwrap.dedent(CASE))
    (root / "expected" / "store.out").write_text(GOLDEN)
    return root


def run_bisect(synth: Synth, project: Path, good: str, bad: str, **kw: Any) -> bs.Result:
    return bs.bisect(synth.path, good, bad, build_cmd=BUILD_CMD, project=project,
                     workdir=synth.path.parent / "work", **kw)


def test_names_the_regressing_commit_and_skips_the_one_that_does_not_build(
        synth: Synth, project: Path) -> None:
    good = synth.commit("synthetic QEMU: wrappers around the installed programs")
    synth.commit("docs: a harmless change")
    broken = synth.commit("dirty-bitmap: a commit that does not build", build_error=True)
    synth.commit("dirty-bitmap: fix the build")
    culprit = synth.commit("qcow2-bitmap: the header write at close fails", store_bug=True)
    synth.commit("docs: another harmless change", store_bug=True)

    # no test path: pytest takes testpaths from the project's pyproject.toml
    r = run_bisect(synth, project, good, "master", pytest_args=["--strict-markers"])

    assert (r.status, r.first_bad) == ("found", culprit), r.message
    # the steps' pytest ran in the project (with a build dir elsewhere, pytest once took
    # the common ancestor of both for its rootdir and collected the self-tests too)
    assert f"rootdir: {project}\n" in Path(r.steps[0].runs[0].log).read_text()
    assert r.first_bad_subject == "qcow2-bitmap: the header write at close fails"
    assert r.exit_code == 0
    (f,) = r.failures
    # the oracle's on-disk check after the shutdown catches it before the golden file
    assert (f.test, f.kind) == ("cases/test_store.py::test_bitmap_stored", "oracle")
    assert "persistent bitmap 'b0'" in f.text, f.text
    by_commit = {s.commit: s for s in r.bisect_steps()}
    assert by_commit[broken].verdict == "skip"
    assert "error: expected ';'" in by_commit[broken].reason
    # the test that passed at BAD is deselected in the steps
    steps = [s for s in r.bisect_steps() if s.runs]
    assert steps and all(s.runs[0].passed + [x.test for x in s.runs[0].failures]
                         == ["cases/test_store.py::test_bitmap_stored"] for s in steps)
    assert r.overhead_per_step() < 5.0, r.overhead_per_step()
    run_dir = Path(r.run_dir)
    saved = json.loads((run_dir / "result.json").read_text())
    assert (saved["status"], saved["first_bad"], saved["exit_code"]) == ("found", culprit, 0)
    assert culprit in (run_dir / "summary.md").read_text()
    for s in r.steps:
        assert (Path(s.dir) / "build.log").exists() and (Path(s.dir) / "step.json").exists()
    text = cli.report(r)
    assert text.startswith(f"qiotests bisect: first bad commit {culprit[:12]} (qcow2-bitmap: ")
    assert "failing tests (1):" in text and "disk.qcow2 stores none" in text, text
    assert f"tested by git bisect ({len([s for s in r.bisect_steps() if s.verdict == 'skip'])}" \
        " skipped)" in text
    synth.assert_untouched()


def test_untestable_neighbours_give_the_candidates(synth: Synth, project: Path) -> None:
    good = synth.commit("base")
    first = synth.commit("the bug arrives in a commit that does not build", store_bug=True,
                         build_error=True)
    last = synth.commit("fix the build", store_bug=True)

    r = run_bisect(synth, project, good, "master")

    assert (r.status, r.exit_code) == ("ambiguous", 1), r.message
    assert sorted(r.candidates) == sorted([first, last])
    assert [(s.commit, s.verdict) for s in r.bisect_steps()] == [(first, "skip")]
    synth.assert_untouched()


def test_refuses_a_dirty_tree_a_bisect_in_progress_and_unknown_revisions(
        synth: Synth, tmp_path: Path) -> None:
    good = synth.commit("one")
    synth.commit("two")

    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "harness.cli", "bisect", "--src", str(synth.path),
             "--workdir", str(tmp_path / "work"), *extra],
            capture_output=True, text=True, check=False, cwd=tmp_path)

    (synth.path / "HISTORY").write_text("edited\n")
    cp = cli("--good", good, "--bad", "master")
    assert cp.returncode == 2 and cp.stdout == ""
    assert cp.stderr.splitlines() == [
        f"qiotests bisect: --src {synth.path}: the tree has uncommitted changes (HISTORY...); "
        "commit or stash them first, since bisecting checks out other commits"]
    synth.git("checkout", "HISTORY")

    synth.git("bisect", "start", "master", good)
    cp = cli("--good", good, "--bad", "master")
    assert cp.returncode == 2 and "a git bisect is already in progress" in cp.stderr
    synth.git("bisect", "reset")

    cp = cli("--good", "no-such-rev", "--bad", "master")
    assert cp.returncode == 2
    assert cp.stderr.strip() == f"qiotests bisect: --good no-such-rev: not a commit in {synth.path}"
    cp = cli("--good", "master", "--bad", good)
    assert "is not an ancestor of --bad" in cp.stderr
    assert not (tmp_path / "work").exists(), "refused before creating anything"
    synth.assert_untouched()


def test_bad_that_passes_and_good_that_fails_are_reported(synth: Synth, project: Path) -> None:
    good = synth.commit("base")
    harmless = synth.commit("harmless")
    bug = synth.commit("bug", store_bug=True)
    synth.commit("still buggy", store_bug=True)

    r = run_bisect(synth, project, good, harmless)
    assert (r.status, r.exit_code) == ("bad-passes", 3)
    assert r.message.startswith(f"BAD {harmless[:12]} passes the tests")
    synth.assert_untouched()

    r = run_bisect(synth, project, bug, "master")
    assert (r.status, r.exit_code) == ("good-fails", 3)
    assert r.message.startswith(f"GOOD {bug[:12]} fails the same way as BAD")
    assert [f.kind for f in r.failures] == ["oracle"]
    synth.assert_untouched()


def test_harness_breakage_aborts_instead_of_blaming_the_commit(
        synth: Synth, project: Path) -> None:
    good = synth.commit("base")
    dead = synth.commit("qemu-system exits at once", no_start=True)
    synth.commit("starts again, with the bug", store_bug=True)

    r = run_bisect(synth, project, good, "master")

    assert (r.status, r.exit_code) == ("harness-broken", 4), r.message
    (step,) = r.bisect_steps()
    assert (step.commit, step.verdict, step.exit) == (dead, "broken", bs.ABORT)
    # pytest stops at its probe of the built programs, before any test
    assert "usage error" in step.reason and "qemu-system-x86_64" in step.reason, step.reason
    assert "exit code 128" in (Path(r.run_dir) / "git-bisect.log").read_text()
    synth.assert_untouched()


def test_repeat_finds_an_intermittent_bug_and_ignores_an_unrelated_flake(
        synth: Synth, project: Path) -> None:
    good = synth.commit("base")
    flaky = synth.commit("qemu-img: every second create fails", create_fails_every=2)
    culprit = synth.commit("qcow2-bitmap: every second store fails", store_bug_every=2)
    synth.commit("harmless", store_bug_every=2)

    r = run_bisect(synth, project, good, "master", repeat=2)

    assert (r.status, r.first_bad) == ("found", culprit), r.message
    at_bad = r.steps[0]
    assert [bool(run.failures) for run in at_bad.runs] == [False, True]
    by_commit = {s.commit: s for s in r.bisect_steps()}
    s = by_commit[flaky]
    # the flake hit the same test in another way (qemu-img failed, no golden diff): it
    # counted neither way; the commit was good after two clean runs
    assert s.verdict == "good" and "1 unrelated failure(s) ignored" in s.reason, s.reason
    assert [f.kind for run in s.runs for f in run.failures] == ["qemu-img-exit-1"]
    synth.assert_untouched()


def test_sigterm_stops_the_step_and_resets_the_bisect(synth: Synth, project: Path) -> None:
    good = synth.commit("base")
    synth.commit("a slow build", slow_build=True)
    synth.commit("bug", store_bug=True)
    work = synth.path.parent / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "bisect", "--src", str(synth.path), "--good",
         good, "--bad", "master", "--workdir", str(work), "--build-cmd",
         " ".join(BUILD_CMD)], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    marker = work / "build" / "building"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    time.sleep(0.2)
    builder = int(marker.read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    result = json.loads((work / "last" / "result.json").read_text())
    assert result["status"] == "interrupted"
    assert not Path(f"/proc/{builder}").exists(), "the build of the step was left running"
    synth.assert_untouched()


# -- classification of what pytest reported (hand-written reports: pure logic) ------------

def junit(tmp_path: Path, *cases: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
                    + "".join(cases) + "</testsuite></testsuites>")
    return path


def case(name: str, inner: str = "", classname: str = "cases.test_x") -> str:
    return f'<testcase classname="{classname}" name="{name}" time="0.1">{inner}</testcase>'


def failure(message: str, text: str = "", tag: str = "failure") -> str:
    from xml.sax.saxutils import escape, quoteattr
    return f"<{tag} message={quoteattr(message)}>{escape(text or message)}</{tag}>"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "test_x.py").write_text("")
    (tmp_path / "log").write_text("ERROR: --qemu-build /b: no QEMU program in it\n")
    return tmp_path


def judge(tree: Path, status: int, *cases: str) -> bs.Run:
    return bs.judge_run(status, junit(tree, *cases), tree / "log", tree, 1.0)


ABORT_TEXT = """test_x.py:23: vm.qmp("query-status")
MachineExitError: vm 'vm0': QMP connection lost during query-status
  command: /b/qemu-system-x86_64 -machine none
  status: killed by SIGABRT
  log tail:
    qemu-system-x86_64: ../block.c:5423: bdrv_replace_node_common: \
Assertion `from->quiesce_counter' failed."""


def test_failure_kinds(tree: Path) -> None:
    run = judge(tree, 1,
                case("test_a[p-1]", failure("GoldenMismatch: output differs from ...")),
                case("test_b", failure("OracleFailure: bitmap b0 misses 0x0-0x1000")),
                case("test_c", failure(ABORT_TEXT.split("\n", 1)[0], ABORT_TEXT)),
                case("test_d", failure("AssertionError: one is not two\nassert 1 == 2")),
                case("test_e", failure("ToolError: qemu-img failed (killed by SIGSEGV): x")),
                case("test_f", failure("Failed: Timeout >300.0s")),
                case("test_g", classname="cases.test_x.TestK"),
                case("test_h", '<skipped message="no blockdev-reopen"/>'))
    assert not run.broken
    assert [(f.test, f.kind) for f in run.failures] == [
        ("cases/test_x.py::test_a[p-1]", "golden-diff"),
        ("cases/test_x.py::test_b", "oracle"),
        ("cases/test_x.py::test_c", "qemu-SIGABRT"),
        ("cases/test_x.py::test_d", "assertion"),
        ("cases/test_x.py::test_e", "qemu-img-SIGSEGV"),
        ("cases/test_x.py::test_f", "timeout"),
    ]
    assert "Assertion `from->quiesce_counter' failed" in run.failures[2].detail
    assert run.passed == ["cases/test_x.py::TestK::test_g"]
    assert run.skipped == ["cases/test_x.py::test_h"]


def test_harness_breakage_is_recognised(tree: Path) -> None:
    missing = failure("GoldenError: expected/x.out has no section '=== test_a ==='")
    assert "has no section" in judge(tree, 1, case("test_a", missing)).broken
    assert "usage error" in judge(tree, 4).broken and "no QEMU program" in judge(tree, 4).broken
    assert "collection errors" in judge(tree, 2).broken
    assert "JUnit" in bs.judge_run(1, tree / "nothing.xml", tree / "log", tree, 1.0).broken
    launch = failure("LaunchError: vm 'vm0': exited while starting\n  status: exit status 1")
    assert judge(tree, 1, case("test_a", launch), case("test_b", launch)).broken.startswith(
        "no QEMU started in any test")
    assert not judge(tree, 1, case("test_a", launch), case("test_b")).broken
    assert "without a failed test" in judge(tree, 1, case("test_a")).broken
    teardown = failure("failed on teardown with \"Failed: QEMU left running\"", tag="error")
    run = judge(tree, 1, case("test_a", teardown))
    assert not run.broken and run.failures[0].phase == "teardown"


def test_step_without_state_aborts(tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "harness.bisect", "step", str(tmp_path)],
                        capture_output=True, text=True, check=False)
    assert cp.returncode == bs.ABORT and "state.json" in cp.stderr


def test_bad_options(synth: Synth, tmp_path: Path) -> None:
    good = synth.commit("one")
    synth.commit("two")
    with pytest.raises(ConfigError, match="must be outside the source tree"):
        bs.bisect(synth.path, good, "master", workdir=synth.path / "work")
    with pytest.raises(ConfigError, match="--repeat 0: must be 1 or more"):
        bs.bisect(synth.path, good, "master", repeat=0)
    with pytest.raises(ConfigError, match="are the same commit"):
        bs.bisect(synth.path, "master", "master")
    assert os.listdir(synth.path.parent) == ["qemu"]


def test_a_step_child_gets_the_file_size_limit(tmp_path: Path) -> None:
    """Issue 9 item 9: the build and the pytest run of a bisect step ran without the
    file-size limit; a bisect is where a QEMU of unknown quality runs."""
    log = tmp_path / "child.log"
    assert bs.run_child(CHILD_REPORT, cwd=tmp_path, log=log) == 0
    assert child_report(log) == (processes.max_file_size(), True)
