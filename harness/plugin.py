"""The qiotests pytest plugin: options, the ``qio`` fixture, golden files, reports.

Registered as the ``pytest11`` entry point ``qiotests``, so ``pip install qiotests`` gives
any repository (a QEMU tree, a downstream's own cases) the fixture, the options and the
golden handling; this repository's ``conftest.py`` files hold no logic. Logic lives in the
other ``harness`` modules; the hooks here only connect it to pytest's phases:

* options (``--qemu*``, ``--accel``, ``--regen``...) and two ini settings:
  ``qiotests_expected`` (the golden files' directory, default ``expected`` under the
  rootdir) and ``qiotests_cases`` (directories holding cases; the QEMU under test is probed
  at start only when a run includes one of them, so ``pytest tests`` never starts QEMU);
* discovery once, in the controller, handed to xdist workers as JSON;
* ``@pytest.mark.requires(qmp=[...], args=[...], drivers=[...], node_bitmaps=[...])``, checked
  before the test body: the one way a case skips, always with the probed reason;
* after each passing body, the case context shuts down its VMs (the oracle checks them)
  and writes the oracle's verdict; then the golden comparison; ``--regen`` collected by
  the controller;
* scratch dirs are pytest's ``tmp_path``, kept for failed tests only
  (``tmp_path_retention_policy``; ``-o tmp_path_retention_policy=all`` keeps all);
* the end-of-session check that no QEMU is left running;
* reports: ``--artifacts DIR`` (``harness.artifacts``), the oracle's SVG
  (``harness.report``), annotations and a step summary under GitHub Actions
  (``harness.ghactions``); ``--junitxml`` is pytest's own and merges ``-n`` workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from harness import artifacts, ghactions, processes, signals, tmpdirs
from harness.binaries import ROLES
from harness.errors import ConfigError, GoldenError, HarnessError
from harness.golden import GoldenFile, RegenStore, compare, golden_path_for, section_name
from harness.processes import REGISTRY
from harness.report import (
    draw_oracle_failure,
    failure_line,
    failure_reason,
    harness_failure_report,
)
from harness.session import Case, Environment

ENV_KEY = pytest.StashKey[Environment]()
CASE_KEY = pytest.StashKey[Case]()
CALL_REPORT_KEY = pytest.StashKey[pytest.TestReport]()
PHASES_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
WORKER_ENV = "qiotests_env"
REGEN_PROP = "qiotests-regen"
LEFTOVER_OUT = "qiotests_leftovers"


def expected_dir(config: pytest.Config) -> Path:
    """Where the golden files live: ``qiotests_expected`` under the rootdir."""
    return config.rootpath / str(config.getini("qiotests_expected"))


def _runs_cases(config: pytest.Config) -> bool:
    """Whether this run includes a case directory (``qiotests_cases``; unset: every run)."""
    dirs = [config.rootpath / d for d in config.getini("qiotests_cases")]
    if not dirs:
        return True
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        path = (path if path.is_absolute() else config.invocation_params.dir / path).resolve()
        if any(path.is_relative_to(d.resolve()) or d.resolve().is_relative_to(path)
               for d in dirs):
            return True
    return False


def _discover(config: pytest.Config) -> Environment:
    explicit = {r.key: config.getoption(f"qio_{r.key}") for r in ROLES}
    env = Environment.discover(explicit, config.getoption("qio_build"),
                               config.getoption("qio_accel"), os.environ,
                               config.getoption("qio_guest_kernel"),
                               config.getoption("qio_guest_initrd"))
    # what the session's processes (xdist workers) decide once for all: the guest's accel
    shared = str(tmpdirs.make("session"))
    config.add_cleanup(lambda: shutil.rmtree(shared, ignore_errors=True))
    return env.sharing(shared)


def _say(config: pytest.Config) -> Callable[[str], None]:
    """Progress a case shows on the terminal while it runs (building the guest), also
    from an xdist worker: pytest's capture is suspended for the line, and each line starts
    on a line of its own. In one process the terminal reporter knows whether its progress
    line is open; an xdist worker shares the terminal with the controller, which prints
    the progress dots and could have begun a line since the last one said, so a worker
    always starts a new line (at worst an empty one between two of its own)."""

    def say(text: str) -> None:
        capture = config.pluginmanager.getplugin("capturemanager")
        reporter = config.pluginmanager.getplugin("terminalreporter")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if reporter is not None and not hasattr(config, "workerinput"):
                # the dots of -q do not count as an open line for ensure_newline()
                if getattr(reporter, "_width_of_current_line", 1):
                    reporter.write("\n")
                reporter.write_line(f"qiotests: {text}")
                reporter.flush()
            else:
                sys.stderr.write(f"\nqiotests: {text}\n")
                sys.stderr.flush()
    return say


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(qmp=[...], args=[...], drivers=[...], node_bitmaps=[...]): skip "
        "the test, saying why, unless the QEMU under test has these QMP commands, "
        "'command.argument' arguments, blockdev drivers and 'command.argument' bitmap "
        "lists that take {node, name} references")
    if config.option.help or config.option.version:
        return  # --help and --version must work without a QEMU
    workerinput = getattr(config, "workerinput", None)
    limit = config.getoption("qio_max_file_size")
    try:
        processes.set_max_file_size(processes.parse_size(limit))
    except ValueError as e:
        raise pytest.UsageError(f"--max-file-size: {e}") from None
    # a SIGTERM (CI cancel) cleans up as Ctrl-C does; the controller passes it on to workers
    config.add_cleanup(signals.sigterm_as_ctrl_c(
        None if workerinput is not None else _worker_pids))
    config.pluginmanager.register(_TimeoutGuard(config), "qiotests-timeout")
    if workerinput is not None:
        if workerinput.get(WORKER_ENV):
            config.stash[ENV_KEY] = Environment.from_json(workerinput[WORKER_ENV])
        return
    tmpdirs.sweep()  # what runs killed outright left (harness.tmpdirs)
    if _runs_cases(config):
        try:
            config.stash[ENV_KEY] = _discover(config)
        except ConfigError as e:
            raise pytest.UsageError(str(e)) from None
    config.pluginmanager.register(_Controller(config), "qiotests-controller")


def _worker_pids() -> list[int]:
    """The controller's children that are not programs it started: its xdist workers."""
    ours = {pid for pid, _label in REGISTRY.alive()}
    return [pid for pid in signals.child_pids() if pid not in ours]


#: What a run stopped by SIGTERM says, last (the QEMUs are stopped by then).
SIGTERM_SENTENCE = ("stopped by SIGTERM: the run ends here, its QEMU processes are stopped "
                    "and its qio-* directories removed")


def _check_termination() -> None:
    """A safe point between and inside test phases: a SIGTERM that code catching
    everything dropped is raised again here (harness.signals.Termination)."""
    if signals.termination is not None:
        signals.termination.check()


def terminated_by_sigterm() -> bool:
    return signals.termination is not None and signals.termination.requested


def _fail(message: str) -> None:
    __tracebackhide__ = True
    pytest.fail(message)


class _TimeoutGuard:
    """pytest-timeout's signal method, raised only where that is safe
    (harness.signals.TimeoutClock): a tiny --timeout never breaks into pytest's own code.
    The thread method is left to pytest-timeout. The finalizer errors an interrupted test
    leaves are reported after the garbage collection that finds them
    (harness.signals.UnraisableAfterGC), never inside it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.clock = signals.TimeoutClock(_fail)
        self.unraisable = signals.UnraisableAfterGC()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.unraisable.install()  # around pytest's hook, installed at configure

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.unraisable.uninstall()

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool | None:
        if settings.method != "signal":
            return None
        self.clock.start(settings.timeout)
        return True

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        if not self.clock.active:
            return None
        self.clock.stop()
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> None:
        _check_termination()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.unraisable.flush()
        _check_termination()
        with self.clock.running():
            return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        self.unraisable.flush()
        _check_termination()
        with self.clock.running():
            return (yield)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> Generator[None, None, None]:
        with self.clock.interruptible():  # the test function itself
            return (yield)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self.unraisable.flush()
        _check_termination()

    @pytest.hookimpl(trylast=True)
    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        """pytest has the interruption in hand: a later SIGTERM must not break its
        cleanup. A SIGTERM's is said in one sentence instead of pytest's KeyboardInterrupt
        line and the harness frame it was raised in (pytest prints a message without the
        word KeyboardInterrupt alone)."""
        term = signals.termination
        if term is None or not term.requested:
            return
        term.acknowledge()
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        memo = getattr(reporter, "_keyboardinterrupt_memo", None)
        if memo is not None and getattr(memo, "reprcrash", None) is not None:
            memo.reprcrash.message = SIGTERM_SENTENCE


class _Controller:
    """Hooks that run only in the controlling process (the only one without xdist):
    hands the environment to workers, gathers --regen sections and leftover reports, and
    writes golden files once at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.regen = RegenStore()
        self.leftovers: list[str] = []
        self.written: list[tuple[Path, list[str]]] = []
        self.owned: dict[Path, set[str]] | None = None
        self.results = ghactions.Results()

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        env = self.config.stash.get(ENV_KEY, None)
        node.workerinput[WORKER_ENV] = env.to_json() if env is not None else ""

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:
            self._own([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if self.owned is None:
            self._own(ids)

    def _own(self, nodeids: list[str]) -> None:
        """Which golden sections the collected tests own; only for runs that select whole
        modules (no -k, -m or ::), where a section nobody owns really is stale."""
        opt = self.config.option
        if opt.keyword or opt.markexpr or any("::" in a for a in self.config.args):
            return
        self.owned = {}
        for nodeid in nodeids:
            module = self.config.rootpath / nodeid.split("::", 1)[0]
            golden = golden_path_for(module, expected_dir(self.config))
            self.owned.setdefault(golden, set()).add(section_name(nodeid))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        self.leftovers += getattr(node, "workeroutput", {}).get(LEFTOVER_OUT, [])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.results.add(report)
        if report.when != "call" or not report.passed:
            return
        for key, value in report.user_properties:
            if key == REGEN_PROP:
                path, name, text = cast(tuple[str, str, str], value)
                self.regen.record(Path(path), name, text)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # trylast: pytest's own sessionfinish tears down the fixtures of a test that was
        # interrupted (Ctrl-C) first, so its VM is stopped there, not reported here
        self.leftovers += [f"{pid} {label}" for pid, label in REGISTRY.kill_all()]
        tmpdirs.sweep()  # the directories of workers that were killed (xdist's kill too)
        if self.leftovers and session.exitstatus in (pytest.ExitCode.OK,
                                                     pytest.ExitCode.TESTS_FAILED):
            # a QEMU outliving its test is a harness bug: fail the run
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if terminated_by_sigterm():  # even if the run went on to its end
            session.exitstatus = pytest.ExitCode.INTERRUPTED
        self.written = self.regen.write_all()
        if self.regen.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # a golden file was not written

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if ghactions.enabled(os.environ):
            self._github(tr)
        if self.leftovers:
            tr.write_sep("=", "QEMU processes left running", red=True)
            tr.write_line("started by the harness and still running at the end of the session "
                          "(killed now): " + "; ".join(self.leftovers))
        orphans: list[tuple[Path, list[str]]] = []
        malformed = list(self.regen.problems)
        for path, owned in sorted((self.owned or {}).items()):
            try:
                orphans.append((path, GoldenFile.load(path).orphans(owned)))
            except GoldenError as e:
                if not any(m.startswith(f"{path}:") for m in malformed):
                    malformed.append(str(e))
        if malformed:
            tr.write_sep("=", "golden files that cannot be used", red=True)
            for problem in malformed:
                tr.write_line(problem)
        if any(names for _, names in orphans):
            tr.write_sep("=", "golden sections no test owns (delete them)", yellow=True)
            for path, names in orphans:
                where = os.path.relpath(path, self.config.rootpath)
                for name in names:
                    tr.write_line(f"'=== {name} ===' in {where} belongs to no test")
        if self.written:
            tr.write_sep("=", "golden files (--regen)")
            for path, changed in self.written:
                what = ", ".join(changed) if changed else "no change"
                tr.write_line(f"{os.path.relpath(path, self.config.rootpath)}: {what}")
            for note in self.regen.mended:
                tr.write_line(note)

    def _github(self, tr: Any) -> None:
        """Annotations in the log, the table in the step summary (GITHUB_ACTIONS=true)."""
        tr.ensure_newline()
        for line in self.results.annotations(self.config.rootpath,
                                             os.environ.get("GITHUB_WORKSPACE")):
            tr.write_line(line)
        path = os.environ.get("GITHUB_STEP_SUMMARY")
        if path and self.results.tests:
            env = self.config.stash.get(ENV_KEY, None)
            notes = tuple(env.header_lines()[:2]) if env is not None else ()
            ghactions.append_summary(path, self.results.markdown(notes=notes))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return config.stash[ENV_KEY].header_lines() if ENV_KEY in config.stash else []


def _environment(config: pytest.Config) -> Environment:
    if ENV_KEY not in config.stash:
        config.stash[ENV_KEY] = _discover(config)
    return config.stash[ENV_KEY]


def unmet_requirements(env: Environment, qmp: Sequence[str] = (),
                       drivers: Sequence[str] = (),
                       node_bitmaps: Sequence[str] = (),
                       args: Sequence[str] = ()) -> str | None:
    """Why the QEMU under test cannot run a case (None if it can), from the probe."""
    version = env.probe.version
    missing = env.missing_commands(qmp)
    if missing:
        return f"QEMU {version} lacks QMP command(s) {', '.join(missing)}"
    for ref in args:
        command, _, member = ref.partition(".")
        if not env.probe.has_argument(command, member):
            return f"QEMU {version}: {command} has no argument '{member}'"
    known = env.probe.blockdev_drivers()
    absent = [d for d in drivers if d not in known]
    if absent:
        return f"QEMU {version} has no blockdev driver(s) {', '.join(absent)}"
    for ref in node_bitmaps:
        command, _, member = ref.partition(".")
        if not env.probe.takes_node_bitmaps(command, member):
            return (f"QEMU {version}: {command} '{member}' takes no {{node, name}} bitmap "
                    "references")
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``requires`` markers, before any fixture runs: skip with the probed reason."""
    for mark in item.iter_markers("requires"):
        if mark.args:
            raise pytest.UsageError(f"{item.nodeid}: requires() takes keywords only "
                                    "(qmp=, args=, drivers=, node_bitmaps=)")
        reason = unmet_requirements(_environment(item.config), **mark.kwargs)
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def qio_env(request: pytest.FixtureRequest) -> Environment:
    """The QEMU under test; probed here only for a case outside ``qiotests_cases``."""
    return _environment(request.config)


@pytest.fixture
def qio(request: pytest.FixtureRequest, tmp_path: Path, qio_env: Environment) -> Iterator[Case]:
    """The test's case context: scratch dir, transcript, qemu-img/qemu-io, VMs, oracle.

    The scratch dir is pytest's tmp_path: with ``tmp_path_retention_policy = "failed"``
    pytest keeps a failing test's for the report's paths to point into.
    """
    case: Case | None = None
    try:
        with signals.timeout_deferred():  # made and known to teardown as one step
            case = Case(qio_env, tmp_path, say=_say(request.config))
            request.node.stash[CASE_KEY] = case
    except BaseException:
        if case is not None:  # a --timeout: no teardown for a fixture that never yielded
            case.close(failed=True)
        raise
    yield case
    rep = request.node.stash.get(CALL_REPORT_KEY, None)
    failed = rep is None or not rep.passed
    problems = case.close(failed=failed)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """After the body: a VM that died unasked fails the test, then the golden check."""
    result = yield
    case = item.stash.get(CASE_KEY, None)
    if case is None:
        return result
    case.finish()
    golden = golden_path_for(Path(str(item.path)), expected_dir(item.config))
    name = section_name(item.nodeid)
    text = case.log.text()
    if item.config.getoption("qio_regen"):
        item.user_properties.append((REGEN_PROP, (str(golden), name, text)))
        return result
    if text or name in GoldenFile.load(golden).sections:
        compare(golden, name, text, case.scratch / f"{golden.stem}.out.actual",
                label=os.path.relpath(golden, item.config.rootpath))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Reports: the harness's short text, the case's line and reason for the CI reports
    (carried to the xdist controller as report attributes), the oracle's drawing; after
    teardown, a failed test's files for --artifacts."""
    if call.excinfo is not None:
        # a frame the --timeout interrupted may have no line number: pytest would fail
        signals.mend_tracebacks(call.excinfo.value)
    rep = yield
    if rep.when == "call":
        item.stash[CALL_REPORT_KEY] = rep
    if rep.failed and call.excinfo is not None:
        case_file = Path(str(item.path))
        if call.excinfo.errisinstance(HarnessError):
            rep.longrepr = harness_failure_report(call.excinfo, case_file)
        case = item.stash.get(CASE_KEY, None)
        drawing = draw_oracle_failure(call.excinfo, case.scratch if case else None,
                                      item.nodeid)
        if drawing is not None and isinstance(rep.longrepr, str):
            rep.longrepr += f"\nthe disk as the oracle saw it: {drawing}"
        vars(rep).update({
            ghactions.WHERE_ATTR: (item.location[0],
                                   failure_line(call.excinfo, case_file,
                                                (item.location[1] or 0) + 1)),
            ghactions.REASON_ATTR: failure_reason(call.excinfo),
        })
    item.stash.setdefault(PHASES_KEY, {})[rep.when] = rep
    if rep.when == "teardown":
        _collect_artifacts(item)
    return rep


def _collect_artifacts(item: pytest.Item) -> None:
    """--artifacts DIR: a failed test's transcript, diff, logs and report text."""
    root = item.config.getoption("qio_artifacts")
    phases = item.stash.get(PHASES_KEY, {})
    failed = [(when, r.longreprtext) for when, r in phases.items() if r.failed]
    if root is None or not failed:
        return
    case = item.stash.get(CASE_KEY, None)
    artifacts.collect(item.config.invocation_params.dir / root, item.nodeid,
                      case.scratch if case else None, failed)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """In an xdist worker: kill and report (to the controller) what is still running."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[LEFTOVER_OUT] = [f"{pid} {label}" for pid, label in REGISTRY.kill_all()]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qiotests", "QEMU under test")
    for role in ROLES:
        group.addoption(role.option, dest=f"qio_{role.key}", metavar="PATH",
                        help=f"{role.name} to test (else ${role.env}, the build dir, PATH)")
    group.addoption("--qemu-build", dest="qio_build", metavar="DIR",
                    help="a QEMU build tree (or unpacked .deb tree) to take the programs from")
    group.addoption("--accel", dest="qio_accel", default="auto",
                    choices=("auto", "kvm", "tcg", "qtest"),
                    help="accelerator for qemu-system (auto: KVM when usable, else TCG)")
    group.addoption("--guest-kernel", dest="qio_guest_kernel", metavar="FILE",
                    help="the kernel guest cases boot (with --guest-initrd; default: built "
                    "from apt packages on first use, see 'qiotests guest build')")
    group.addoption("--guest-initrd", dest="qio_guest_initrd", metavar="FILE",
                    help="the initrd guest cases boot: its /init loads what a virtio-blk "
                    "disk needs, prints QIO-GUEST-READY on ttyS0 and runs a shell there")
    group.addoption("--max-file-size", dest="qio_max_file_size", metavar="SIZE",
                    default="4G", help="largest file any program the harness starts may "
                    "write (RLIMIT_FSIZE; 4G, 512M, unlimited; default 4G): a QEMU that "
                    "writes without end is stopped there instead of filling the disk")
    group.addoption("--regen", dest="qio_regen", action="store_true",
                    help="rewrite the golden sections of the tests that run")
    group.addoption("--artifacts", dest="qio_artifacts", metavar="DIR",
                    help="for each failing test, copy its transcript, diff, QEMU and QMP "
                    "logs and report text into DIR/<test id>/ (for CI uploads)")
    parser.addini("qiotests_expected", default="expected",
                  help="directory of the golden files, relative to the rootdir")
    parser.addini("qiotests_cases", type="paths", default=[],
                  help="directories holding qiotests cases: the QEMU under test is probed "
                  "at start only when a run includes one (default: every run)")
