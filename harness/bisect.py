"""Find the QEMU commit that broke a case: ``git bisect run`` with the cases as the test.

The driver (:func:`bisect`) checks its inputs, tests the two ends itself, then lets
``git bisect run`` call the step (``python -m harness.bisect step RUN_DIR``) on each
commit git picks. A step:

1. builds the commit with one replaceable build command (``{src}``/``{build}`` filled in);
   a failed build exits 125, so git skips the commit;
2. runs the tests that failed at BAD (the same pytest arguments, with every test that
   passed or skipped there deselected), ``--qemu-build`` pointing at the build and
   ``--junitxml`` recording what happened;
3. compares each failure with the ones seen at BAD by *signature*: the test id and the
   kind of failure (``golden-diff``, ``oracle``, ``assertion``, ``qemu-SIGABRT``...);
4. exits 0 (good), 1 (bad), 125 (skip) or 128 (abort) for git.

Harness breakage is never a verdict on QEMU: a pytest usage or internal error, a collection
error, no JUnit report, a golden file problem (a missing section), a probe that cannot
find or start the built programs, or a run where no QEMU starts at all aborts the bisect
(128) instead of calling the commit bad.

``--repeat N`` is for failures that show only sometimes. A step is good after N clean runs
and bad at the first run with a failure whose signature was seen at BAD. A run whose
failures are all *unrelated* (another test, or the same test failing another way) counts
neither way and is repeated; after ``max(2, N)`` such runs the commit is skipped (125), so
an unrelated flake or a second bug in the range can neither mark a commit bad nor pass it
as good.

Everything is kept in a work dir outside the source tree (default
``$XDG_CACHE_HOME/qiotests/bisect/<tree name>``): the build dir (reused between bisects)
and one ``run-<UTC time>/`` per bisect with ``state.json`` (what the steps read),
``steps/<n>-<sha>/`` (build log, pytest log and JUnit XML per run, ``step.json``),
``git-bisect.log``, and the verdict as ``result.json`` and ``summary.md``.

This module returns data and writes files; only the ``qiotests bisect`` command and the
step's one line for git's log print.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import build as qemu_build
from harness import processes
from harness.errors import ConfigError

# exit statuses `git bisect run` understands
GOOD, BAD, SKIP, ABORT = 0, 1, 125, 128

#: the variables that would make pytest test another QEMU than the one just built
QEMU_ENV_VARS = ("QEMU_PROG", "QEMU_IMG_PROG", "QEMU_IO_PROG", "QEMU_NBD_PROG", "QSD_PROG",
                 "QEMU_BUILD_DIR")
DEFAULT_PYTEST_ARGS = ("cases",)
STEP_LINE = "step"  # how the step's one line for git's log starts
STOP_GRACE = 30.0  # seconds an interrupted child gets to tear down (pytest stops its VMs)
GIT_TIMEOUT = 600.0  # seconds one git command may take (a checkout of a big tree on a slow disk)

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------
# failures and their signatures


@dataclass(frozen=True)
class Failure:
    """One failed test of one pytest run, as the JUnit report tells it."""

    test: str    # pytest node id, e.g. cases/test_165.py::test_persistent
    kind: str    # what went wrong, coarse enough to compare across commits
    phase: str   # call, setup or teardown
    detail: str  # the line a person reads first
    text: str    # the whole report (the diff, the QEMU command line and log tail...)
    launch: bool = False  # QEMU never got as far as the QMP connection

    @property
    def signature(self) -> tuple[str, str]:
        return (self.test, self.kind)


#: failure kinds that say the harness (or its input) is broken, not QEMU
BROKEN_KINDS = ("golden-file", "config")

_EXC_LINE = re.compile(r"^(?:E\s+)?(?P<name>[A-Z][A-Za-z0-9_]*(?:\.[A-Z][A-Za-z0-9_]*)*): ",
                       re.M)
_STATUS = re.compile(r"^\s*status: (?:killed by (?P<sig>SIG[A-Z0-9]+|signal \d+)"
                     r"|exit status (?P<code>-?\d+))", re.M)
_TOOL = re.compile(r"^(?P<tool>[\w.-]+) failed \((?:killed by (?P<sig>SIG[A-Z0-9]+)"
                   r"|exit status (?P<code>-?\d+))")
_QEMU_ASSERT = re.compile(r"(?:Assertion [`'].*?' failed|assertion failed.*)", re.I)


def classify(message: str, text: str) -> tuple[str, str, bool]:
    """(kind, detail, launch) of one failure report; see :class:`Failure`."""
    body = f"{message}\n{text}"
    m = _EXC_LINE.search(message) or _EXC_LINE.search(text)
    name = m.group("name").rsplit(".", 1)[-1] if m else ""
    line = body[m.start():].split("\n", 1)[0].strip() if m else message.split("\n", 1)[0]
    detail = re.sub(r"^E\s+", "", line)[:300]
    status = _STATUS.search(body)
    if name == "GoldenMismatch":
        return "golden-diff", detail, False
    if name == "GoldenError":
        return "golden-file", detail, False
    if name in ("ConfigError", "UsageError"):
        return "config", detail, False
    if name == "OracleFailure":
        return "oracle", detail, False
    if name in ("MachineExitError", "LaunchError", "MachineError"):
        launch = name == "LaunchError"
        if status and status.group("sig"):
            kind = f"qemu-{status.group('sig').replace(' ', '-')}"
        elif status:
            kind = f"qemu-exit-{status.group('code')}"
        else:
            kind = "qemu-launch" if launch else "qemu-lost"
        crash = _QEMU_ASSERT.search(body)
        if crash:
            detail = f"{detail} [{crash.group(0)[:200]}]"
        return kind, detail, launch
    if name == "MachineTimeout":
        return "qemu-timeout", detail, False
    if name == "MachineStateError":
        return "qemu-not-running", detail, False
    if name == "CommandError":
        return "qmp-error", detail, False
    if name == "ToolError":
        t = _TOOL.search(body[m.end():] if m else body)
        if t:
            how = t.group("sig") or f"exit-{t.group('code')}"
            return f"{t.group('tool')}-{how}", detail, False
        return "tool-error", detail, False
    if name == "Failed" and "Timeout" in detail:
        return "timeout", detail, False
    if name == "Failed" and "XPASS(strict)" in body:
        return "xpass-strict", detail, False
    if name == "AssertionError":
        return "assertion", detail, False
    return (f"exception-{name}" if name else "unknown"), detail, False


def nodeid(classname: str, name: str, project: Path) -> str:
    """The pytest node id behind a JUnit (classname, name) pair.

    pytest writes ``cases/test_x.py::TestA::test_b[p]`` as classname ``cases.test_x.TestA``
    and name ``test_b[p]``; the longest dotted prefix that is a file of the project is the
    module path.
    """
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (project / path).is_file():
            return "::".join([path, *parts[i:], name])
    return "::".join([*parts, name]) if parts else name


@dataclass
class Run:
    """One pytest run at one commit."""

    status: int
    seconds: float
    log: str
    junit: str
    failures: list[Failure] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    broken: str = ""  # why this run says nothing about QEMU ('' when it does)

    @property
    def clean(self) -> bool:
        return not self.broken and not self.failures and self.status == 0


def read_junit(path: Path, project: Path) -> tuple[list[Failure], list[str], list[str]]:
    """(failures, passed ids, skipped ids) of a JUnit file; raises ValueError/OSError."""
    root = ET.parse(path).getroot()
    failures: list[Failure] = []
    passed: list[str] = []
    skipped: list[str] = []
    for case in root.iter("testcase"):
        test = nodeid(case.get("classname", ""), case.get("name", ""), project)
        bad = [e for e in case if e.tag in ("failure", "error")]
        if not bad:
            (skipped if case.find("skipped") is not None else passed).append(test)
            continue
        for elem in bad:
            message = elem.get("message", "")
            text = elem.text or ""
            phase = "call"
            if elem.tag == "error":
                m = re.match(r"failed on (\w+) with", message)
                phase = m.group(1) if m else "collect"
            kind, detail, launch = classify(message, text)
            failures.append(Failure(test, kind, phase, detail, text or message, launch))
    return failures, passed, skipped


def judge_run(status: int, junit: Path, log: Path, project: Path, seconds: float) -> Run:
    """What one pytest run says: its failures, or why it says nothing (``broken``)."""
    run = Run(status, seconds, str(log), str(junit))
    if status not in (0, 1):
        run.broken = f"pytest exited {_exit_name(status)}: {_pytest_reason(log)}"
        return run
    try:
        run.failures, run.passed, run.skipped = read_junit(junit, project)
    except (OSError, ET.ParseError) as e:
        run.broken = f"pytest wrote no readable JUnit report ({e})"
        return run
    broken = [f for f in run.failures if f.kind in BROKEN_KINDS or f.phase == "collect"]
    if broken:
        f = broken[0]
        run.broken = f"{f.test}: {f.detail}"
    elif run.failures and not run.passed and all(f.launch for f in run.failures):
        run.broken = f"no QEMU started in any test ({run.failures[0].detail})"
    elif status == 1 and not run.failures:
        run.broken = f"pytest failed the run without a failed test: {_pytest_reason(log)}"
    elif status == 0 and run.failures:
        run.broken = "pytest exited 0 but its JUnit report has failures"
    return run


def _exit_name(status: int) -> str:
    names = {2: "2 (interrupted or collection errors)", 3: "3 (internal error)",
             4: "4 (usage error)", 5: "5 (no tests collected)"}
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return names.get(status, str(status))


def _pytest_reason(log: Path) -> str:
    """The line of pytest's output that says why it stopped."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    for pat in (r"^(ERROR|INTERNALERROR|ImportError|E   )", r"^(=+ .*(error|left running).*=+)$",
                r"\S"):
        for line in lines if pat != r"\S" else reversed(lines):
            if re.search(pat, line, re.I):
                return line.strip()[:300]
    return "(empty output)"


# ---------------------------------------------------------------------------------------
# the plan the steps share, and the record of each step


@dataclass
class Plan:
    """Everything a step needs, written by the driver as ``RUN_DIR/state.json``."""

    src: str
    build_dir: str
    build_cmd: list[str]
    project: str
    pytest_args: list[str]
    repeat: int
    run_dir: str
    python: str = sys.executable
    deselect: list[str] = field(default_factory=list)
    targets: list[list[str]] = field(default_factory=list)  # [test, kind] seen at BAD

    def save(self) -> None:
        _write_json(Path(self.run_dir) / "state.json", asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> Plan:
        return cls(**json.loads((run_dir / "state.json").read_text()))

    def target_set(self) -> set[tuple[str, str]]:
        return {(t, k) for t, k in self.targets}


@dataclass
class Step:
    """One commit built and tested."""

    label: str   # "bad", "good", or the step number under git bisect run
    commit: str
    subject: str
    verdict: str  # good, bad, skip, broken
    exit: int     # what git was (or would have been) told
    reason: str
    dir: str
    started: float
    ended: float = 0.0
    build_s: float = 0.0
    tests_s: float = 0.0
    runs: list[Run] = field(default_factory=list)
    git_s: float = 0.0  # before the step: git bisect's checkout and the step's start-up

    @property
    def overhead_s(self) -> float:
        """Seconds beyond build and tests: the step's own work and git's before it."""
        own = self.ended - self.started - self.build_s - self.tests_s
        return max(0.0, own) + self.git_s

    def failures(self) -> list[Failure]:
        """The failures of the last run: the one that decided the verdict."""
        return self.runs[-1].failures if self.runs else []

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["overhead_s"] = round(self.overhead_s, 3)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Step:
        d = {k: v for k, v in d.items() if k != "overhead_s"}
        runs = []
        for r in d.pop("runs"):
            fails = [Failure(**f) for f in r.pop("failures")]
            runs.append(Run(**r, failures=fails))
        return cls(**d, runs=runs)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# children: own process group, stopped with the run on Ctrl-C / SIGTERM


def run_child(argv: Sequence[str], *, cwd: str | Path, log: Path,
              env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None) -> int:
    """Run ``argv`` with its output appended to ``log``; its exit status (-N: signal N).

    The child gets its own process group (:func:`harness.processes.run_logged`), so a
    Ctrl-C in the terminal reaches only us; if we are interrupted (KeyboardInterrupt, or
    SIGTERM turned into one), the child's whole group gets SIGINT (pytest then stops its
    VMs), ``STOP_GRACE`` seconds, then SIGKILL.
    """
    with log.open("ab") as out:
        status = processes.run_logged(argv, out, cwd=cwd, env=env, on_line=on_line,
                                      grace=STOP_GRACE)
    assert status is not None  # waited without a bound
    return status


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (CI cancelling a job) acts as Ctrl-C does."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------
# git


def git(src: str | Path, *args: str, check: bool = True) -> str:
    """``git -C src ARGS``; its stdout, stripped. ConfigError with git's words on failure."""
    cp = _git(src, *args)
    if check and cp.status != 0:
        msg = (cp.stderr.strip() or cp.stdout.strip()).splitlines()
        if cp.timed_out:
            msg = [f"did not finish within {GIT_TIMEOUT:g} s; killed it"]
        raise ConfigError(f"git {' '.join(args)} in {src}: {msg[-1] if msg else 'failed'}")
    return cp.stdout.strip()


def _git(src: str | Path, *args: str) -> processes.Finished:
    return processes.run(["git", "-C", str(src), *args], GIT_TIMEOUT, label="git")


def subject(src: str | Path, rev: str) -> str:
    return git(src, "log", "-1", "--format=%s", rev)


def check_tree(src: Path) -> None:
    """Refuse a tree that is not a git work tree, has local changes, or is mid-bisect."""
    if not (src / ".git").exists():
        raise ConfigError(f"--src {src}: not the top of a git work tree")
    if Path(git(src, "rev-parse", "--absolute-git-dir"), "BISECT_START").exists():
        raise ConfigError(f"--src {src}: a git bisect is already in progress there; "
                          "finish it with 'git bisect reset' first")
    changes = git(src, "status", "--porcelain", "--untracked-files=no")
    if changes:
        first = changes.splitlines()[0].split(None, 1)[-1]
        raise ConfigError(f"--src {src}: the tree has uncommitted changes ({first}...); "
                          "commit or stash them first, since bisecting checks out other commits")


def resolve_commit(src: Path, rev: str, what: str) -> str:
    cp = _git(src, "rev-parse", "--verify", "-q", f"{rev}^{{commit}}")
    if cp.status != 0:
        raise ConfigError(f"{what} {rev}: not a commit in {src}")
    return cp.stdout.strip()


# ---------------------------------------------------------------------------------------
# one step: build, test, judge


def default_build_command() -> list[str]:
    """``qiotests build-qemu {src} --build {build}``: exit 0 when built, else non-zero
    after printing the first compiler error."""
    return [sys.executable, "-m", "harness.cli", "build-qemu", "{src}", "--build", "{build}"]


def build_argv(template: Sequence[str], src: str, build: str) -> list[str]:
    return [a.replace("{src}", src).replace("{build}", build) for a in template]


def pytest_env() -> dict[str, str]:
    """Our environment without what would point pytest at another QEMU or confuse it."""
    return {k: v for k, v in os.environ.items()
            if k not in QEMU_ENV_VARS and not k.startswith("PYTEST_XDIST")
            and k != "PYTEST_CURRENT_TEST"}


def run_tests(plan: Plan, out: Path, n: int) -> Run:
    junit = out / f"junit-{n}.xml"
    log = out / f"pytest-{n}.log"
    # every option of ours as one --opt=value word: pytest takes a separate word that is
    # an existing path (the build dir) for a test path when it looks for the rootdir
    argv = [plan.python, "-m", "pytest", *plan.pytest_args,
            *(f"--deselect={t}" for t in plan.deselect),
            f"--qemu-build={plan.build_dir}", f"--junitxml={junit}",
            # failed tests' scratch dirs (actual output, VM logs) stay with the step
            f"--basetemp={out / f'tmp-{n}'}"]
    log.write_text(f"$ {shlex.join(argv)}\n")
    t0 = time.monotonic()
    status = run_child(argv, cwd=plan.project, log=log, env=pytest_env())
    return judge_run(status, junit, log, Path(plan.project), time.monotonic() - t0)


def test_commit(plan: Plan, label: str, out: Path, *, at_bad: bool = False) -> Step:
    """Build the checked-out commit and judge it against ``plan`` (see the module doc).

    ``at_bad``: this is the BAD end; there is nothing to match yet, and the step is bad
    at its first failing run (up to ``repeat`` runs).
    """
    commit = git(plan.src, "rev-parse", "HEAD")
    step = Step(label, commit, subject(plan.src, commit), "", 0, "", str(out), time.time())
    out.mkdir(parents=True, exist_ok=True)
    try:
        _build_and_judge(plan, step, out, at_bad)
    finally:
        step.ended = time.time()
        _write_json(out / "step.json", step.to_json())
    return step


def _build_and_judge(plan: Plan, step: Step, out: Path, at_bad: bool) -> None:
    log = out / "build.log"
    argv = build_argv(plan.build_cmd, plan.src, plan.build_dir)
    log.write_text(f"$ {shlex.join(argv)}\n")
    t0 = time.monotonic()
    try:
        status = run_child(argv, cwd=plan.src, log=log)
    except OSError as e:
        step.verdict, step.exit, step.reason = "broken", ABORT, f"cannot run the build: {e}"
        return
    finally:
        step.build_s = time.monotonic() - t0
    if status != 0:
        step.verdict, step.exit = "skip", SKIP
        step.reason = f"does not build ({_exit_name(status)}): {first_error(log)}"
        return
    targets = plan.target_set()
    unrelated, clean = 0, 0
    budget = max(2, plan.repeat)
    for n in range(1, plan.repeat + budget + 1):
        run = run_tests(plan, out, n)
        step.runs.append(run)
        step.tests_s += run.seconds
        if run.broken:
            step.verdict, step.exit, step.reason = "broken", ABORT, run.broken
            return
        if at_bad:
            if run.failures:
                step.verdict, step.exit = "bad", BAD
                step.reason = _describe(run.failures)
                return
            if n >= plan.repeat:
                step.verdict, step.exit = "good", GOOD
                step.reason = f"{n} clean run(s)"
                return
            continue
        matching = [f for f in run.failures if f.signature in targets]
        if matching:
            step.verdict, step.exit, step.reason = "bad", BAD, _describe(matching)
            return
        if run.failures:
            unrelated += 1
            if unrelated >= budget:
                step.verdict, step.exit = "skip", SKIP
                step.reason = (f"{unrelated} run(s) failed in ways not seen at BAD: "
                               f"{_describe(run.failures)}")
                return
            continue
        clean += 1
        if clean >= plan.repeat:
            step.verdict, step.exit = "good", GOOD
            step.reason = f"{clean} clean run(s)" + (
                f" ({unrelated} unrelated failure(s) ignored)" if unrelated else "")
            return
    raise AssertionError("unreachable: every path through the runs decides")  # pragma: no cover


def _describe(failures: Sequence[Failure]) -> str:
    shown = ", ".join(f"{f.test} ({f.kind})" for f in failures[:3])
    return shown + (f" and {len(failures) - 3} more" if len(failures) > 3 else "")


def first_error(log: Path) -> str:
    """The first line of the first compiler (or meson, or linker) error in a build log."""
    try:
        lines = log.read_text(errors="replace").splitlines()[1:]  # after our "$ argv"
    except OSError:
        return "(no build log)"
    # build-qemu prints the error block indented under its own message: undo that
    block = qemu_build.first_error("\n".join(ln.strip() for ln in lines))
    found = block.splitlines() or ["(empty build log)"]
    return next((ln for ln in found if re.search(r"\berror\b", ln, re.I)), found[0])[:300]


def step_main(run_dir: Path) -> int:
    """What ``git bisect run`` calls: test HEAD, record it, return git's exit status."""
    try:
        plan = Plan.load(run_dir)
    except (OSError, ValueError, TypeError) as e:
        print(f"qiotests bisect step: cannot read {run_dir}/state.json: {e}", file=sys.stderr)
        return ABORT
    steps = run_dir / "steps"
    n = 1 + sum(1 for p in steps.glob("[0-9]*") if p.is_dir())
    with sigterm_as_interrupt():
        try:
            commit = git(plan.src, "rev-parse", "HEAD")
            step = test_commit(plan, str(n), steps / f"{n:02d}-{commit[:12]}")
        except KeyboardInterrupt:
            print("qiotests bisect step: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # a harness bug must abort the bisect, not mark a commit
            print(f"qiotests bisect step: {type(e).__name__}: {e}", file=sys.stderr)
            return ABORT
    print(f"{STEP_LINE} {n} {commit[:12]} {step.verdict}: {step.reason} "
          f"(build {step.build_s:.1f} s, tests {step.tests_s:.1f} s)", flush=True)
    return step.exit


# ---------------------------------------------------------------------------------------
# the driver


@dataclass
class Result:
    """The outcome of one bisect, as ``result.json`` holds it."""

    status: str  # found, ambiguous, refused, good-fails, bad-passes, end-does-not-build,
    #             harness-broken, interrupted
    message: str
    src: str = ""
    good: str = ""
    bad: str = ""
    run_dir: str = ""
    first_bad: str = ""
    first_bad_subject: str = ""
    candidates: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)  # the ends first, then git's steps
    wall_s: float = 0.0
    git_s: float = 0.0  # git bisect's own time after the last step (verdict, reset)
    reset_ok: bool = True

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    def bisect_steps(self) -> list[Step]:
        return [s for s in self.steps if s.label not in ("bad", "good")]

    def overhead_per_step(self) -> float:
        """Seconds per bisect step beyond build and tests: our own work plus git's."""
        steps = self.bisect_steps()
        if not steps:
            return 0.0
        return (sum(s.overhead_s for s in steps) + self.git_s) / len(steps)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [s.to_json() for s in self.steps]
        d["exit_code"] = self.exit_code
        d["overhead_per_step_s"] = round(self.overhead_per_step(), 3)
        return d


#: ``qiotests bisect`` exit statuses, by result
EXIT_CODES = {"found": 0, "ambiguous": 1, "refused": 2, "good-fails": 3, "bad-passes": 3,
              "end-does-not-build": 3, "harness-broken": 4, "interrupted": 130}


def default_workdir(src: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qiotests" / "bisect" / src.name


def _outside(path: Path, src: Path, what: str) -> Path:
    path = path.expanduser().resolve()
    if path == src or path.is_relative_to(src):
        raise ConfigError(f"{what} {path}: must be outside the source tree {src}")
    return path


def bisect(src: str | Path, good: str, bad: str, *, pytest_args: Sequence[str] = (),
           build_dir: str | Path | None = None, build_cmd: Sequence[str] | None = None,
           repeat: int = 1, workdir: str | Path | None = None,
           project: str | Path | None = None, progress: Progress | None = None) -> Result:
    """Bisect ``good..bad`` in the git tree ``src``; see the module docstring.

    Bad input (not a git tree, local changes, a bisect in progress, unknown revisions,
    GOOD not an ancestor of BAD, a work dir inside the tree) raises ConfigError before
    anything is touched. Everything after returns a :class:`Result` (also written as
    ``result.json`` and ``summary.md`` in its run dir); the tree is always back on its
    original HEAD, with no bisect in progress, when this returns.
    """
    say = progress or (lambda _line: None)
    t0 = time.time()
    srcp = Path(src).expanduser().resolve()
    if repeat < 1:
        raise ConfigError(f"--repeat {repeat}: must be 1 or more")
    check_tree(srcp)
    good_sha = resolve_commit(srcp, good, "--good")
    bad_sha = resolve_commit(srcp, bad, "--bad")
    if good_sha == bad_sha:
        raise ConfigError(f"--good {good} and --bad {bad} are the same commit")
    if _git(srcp, "merge-base", "--is-ancestor", good_sha, bad_sha).status != 0:
        raise ConfigError(f"--good {good} is not an ancestor of --bad {bad}")
    work = _outside(Path(workdir) if workdir else default_workdir(srcp), srcp, "--workdir")
    build = _outside(Path(build_dir) if build_dir else work / "build", srcp, "--build")
    template = list(build_cmd) if build_cmd else default_build_command()
    run_dir = work / f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    while run_dir.exists():
        run_dir = run_dir.with_name(run_dir.name + "+")
    (run_dir / "steps").mkdir(parents=True)
    last = work / "last"
    with contextlib.suppress(OSError):
        last.unlink(missing_ok=True)
        last.symlink_to(run_dir.name)
    plan = Plan(str(srcp), str(build), template,
                str(Path(project).resolve() if project else Path.cwd()),
                list(pytest_args) or list(DEFAULT_PYTEST_ARGS), repeat, str(run_dir))
    plan.save()
    result = Result("harness-broken", "the bisect driver stopped on an unexpected error",
                    str(srcp), good_sha, bad_sha, str(run_dir))
    with sigterm_as_interrupt():
        try:
            _drive(plan, good_sha, bad_sha, result, say)
        except KeyboardInterrupt:
            result.status = "interrupted"
            result.message = "interrupted (Ctrl-C or SIGTERM); the tree is back where it was"
        except ConfigError as e:  # git refused something half-way (a lock, a checkout)
            result.status = "harness-broken"
            result.message = str(e)
        finally:
            result.wall_s = time.time() - t0
            _write_json(run_dir / "result.json", result.to_json())
            (run_dir / "summary.md").write_text(summary_markdown(result))
    return result


def _drive(plan: Plan, good: str, bad: str, result: Result, say: Progress) -> None:
    src = Path(plan.src)
    run_dir = Path(plan.run_dir)
    steps = run_dir / "steps"
    with _restored_head(src):
        say(f"BAD {bad[:12]} ({subject(src, bad)}): build, then {shlex.join(plan.pytest_args)}")
        git(src, "checkout", "-q", "--detach", bad)
        at_bad = test_commit(plan, "bad", steps / f"bad-{bad[:12]}", at_bad=True)
        result.steps.append(at_bad)
        say(f"BAD: {at_bad.verdict}: {at_bad.reason}")
        if _end_wrong(at_bad, "BAD", result, want="bad"):
            return
        failing = at_bad.failures()
        plan.targets = [list(sig) for sig in sorted({f.signature for f in failing})]
        failing_ids = {f.test for f in failing}
        plan.deselect = sorted({t for r in at_bad.runs for t in (*r.passed, *r.skipped)}
                               - failing_ids)
        plan.save()
        say(f"GOOD {good[:12]} ({subject(src, good)}): build, then the {len(failing_ids)} "
            f"test(s) failing at BAD")
        git(src, "checkout", "-q", "--detach", good)
        at_good = test_commit(plan, "good", steps / f"good-{good[:12]}")
        result.steps.append(at_good)
        say(f"GOOD: {at_good.verdict}: {at_good.reason}")
        if _end_wrong(at_good, "GOOD", result, want="good"):
            return
    _run_git_bisect(plan, good, bad, result, say)


def _end_wrong(step: Step, name: str, result: Result, want: str) -> bool:
    """Record why an end cannot start a bisect; False when it behaves as it must."""
    if step.verdict == want:
        return False
    short = step.commit[:12]
    if step.verdict == "broken":
        result.status = "harness-broken"
        result.message = f"at {name} {short} the harness itself failed: {step.reason}"
    elif step.verdict == "skip" and step.reason.startswith("does not build"):
        result.status = "end-does-not-build"
        result.message = f"{name} {short} {step.reason}"
    elif want == "bad":
        result.status = "bad-passes"
        result.message = (f"BAD {short} passes the tests ({step.reason}): nothing to bisect; "
                          "with a failure that shows only sometimes, try --repeat N")
    else:
        result.status = "good-fails"
        how = ("fails the same way as BAD" if step.verdict == "bad"
               else "fails in other ways than BAD")
        result.message = f"GOOD {short} {how}: {step.reason}"
    result.failures = step.failures()
    return True


@contextlib.contextmanager
def _restored_head(src: Path) -> Iterator[None]:
    """Check out what was checked out before (branch or detached commit) on the way out."""
    branch = git(src, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    sha = git(src, "rev-parse", "HEAD")
    try:
        yield
    finally:
        if branch:
            git(src, "checkout", "-q", branch)
        else:
            git(src, "checkout", "-q", "--detach", sha)


def _run_git_bisect(plan: Plan, good: str, bad: str, result: Result, say: Progress) -> None:
    src = Path(plan.src)
    run_dir = Path(plan.run_dir)
    log = run_dir / "git-bisect.log"

    def on_line(line: str) -> None:
        # the steps' verdicts and git's choices; the rest (commit details) is in the log
        if line.startswith((f"{STEP_LINE} ", "Bisecting:", "[")) or "first bad" in line:
            say(line)

    t_git = time.time()
    try:
        git(src, "bisect", "start", bad, good, "--")
        if "# first bad commit:" not in git(src, "bisect", "log"):
            step = [plan.python, "-m", "harness.bisect", "step", str(run_dir)]
            run_child(["git", "-C", str(src), "bisect", "run", *step], cwd=src, log=log,
                      on_line=on_line)
        bisect_log = git(src, "bisect", "log")
        with log.open("a") as f:
            f.write("\n$ git bisect log\n" + bisect_log + "\n")
    finally:
        try:
            git(src, "bisect", "reset")
        except ConfigError as e:
            result.reset_ok = False
            say(f"could not reset the bisect: {e}")
    t_end = time.time()
    steps = sorted((Step.from_json(json.loads(p.read_text()))
                    for p in (run_dir / "steps").glob("[0-9]*/step.json")),
                   key=lambda s: int(s.label))
    prev = t_git
    for s in steps:
        s.git_s, prev = max(0.0, s.started - prev), s.ended
    result.steps += steps
    result.git_s = max(0.0, t_end - prev)  # after the last step: git's verdict, the reset
    broken = [s for s in steps if s.verdict == "broken"]
    found = re.search(r"^# first bad commit: \[([0-9a-f]+)\] (.*)$", bisect_log, re.M)
    possible = re.findall(r"^# possible first bad commit: \[([0-9a-f]+)\]", bisect_log, re.M)
    if broken:
        s = broken[-1]
        result.status = "harness-broken"
        result.message = (f"aborted at {s.commit[:12]} ({s.subject}): the harness itself "
                          f"failed: {s.reason}")
        result.failures = s.failures()
    elif found:
        result.status = "found"
        result.first_bad, result.first_bad_subject = found.group(1), found.group(2)
        result.message = f"first bad commit {found.group(1)[:12]} ({found.group(2)})"
        by_commit = {s.commit: s for s in result.steps if s.verdict == "bad"}
        result.failures = by_commit[found.group(1)].failures() \
            if found.group(1) in by_commit else []
    elif possible:
        result.status = "ambiguous"
        result.candidates = possible
        result.message = (f"the first bad commit is one of {len(possible)} commits git could "
                          "not test (they do not build, or failed in other ways): "
                          + ", ".join(c[:12] for c in possible))
    else:
        result.status = "harness-broken"
        result.message = f"git bisect run ended without a verdict; see {log}"


# ---------------------------------------------------------------------------------------
# the report


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60)} s"


def summary_markdown(result: Result) -> str:
    """The verdict, the failing tests with their reports, and the step table."""
    lines = [f"## qiotests bisect: {result.status}", "", result.message, ""]
    if result.first_bad:
        lines += [f"- first bad commit: `{result.first_bad}` {result.first_bad_subject}"]
    lines += [f"- range: `{result.good[:12]}`..`{result.bad[:12]}` in `{result.src}`",
              f"- wall time: {_secs(result.wall_s)}; logs: `{result.run_dir}`", ""]
    if result.steps:
        lines += ["| step | commit | verdict | build | tests | overhead | why |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s in result.steps:
            why = s.reason.replace("|", "\\|")[:160]
            lines.append(f"| {s.label} | `{s.commit[:12]}` {s.subject[:50]} | {s.verdict} | "
                         f"{_secs(s.build_s)} | {_secs(s.tests_s)} | {_secs(s.overhead_s)} | "
                         f"{why} |")
        if result.bisect_steps():
            lines.append(f"\nOverhead per bisect step beyond build and tests (ours and "
                         f"git's): {result.overhead_per_step():.2f} s")
        lines.append("")
    for f in result.failures:
        lines += [f"### `{f.test}`: {f.kind}", "", "```", f.text.rstrip()[:6000], "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.bisect step RUN_DIR``: the command ``git bisect run`` calls."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "step":
        print("usage: python -m harness.bisect step RUN_DIR (qiotests bisect runs it)",
              file=sys.stderr)
        return ABORT
    return step_main(Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())
