"""Pytest wiring for the cases: environment discovery, the ``qio`` fixture, golden files.

Logic lives in ``harness``; the hooks here only connect it to pytest's phases:
discovery at configure time (controller) handed to xdist workers as JSON, the header,
golden comparison right after each test body, ``--regen`` collected by the controller,
and the end-of-session check that no QEMU is left running.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.binaries import ROLES
from harness.errors import ConfigError, HarnessError
from harness.golden import RegenStore, compare, golden_path_for, section_name
from harness.report import harness_failure_report
from harness.processes import REGISTRY
from harness.session import Case, Environment

ENV_KEY = pytest.StashKey[Environment]()
REGEN_KEY = pytest.StashKey[RegenStore]()
CASE_KEY = pytest.StashKey[Case]()
EXPECTED_DIR = Path(__file__).resolve().parent.parent / "expected"
WORKER_ENV = "qiotests_env"
REGEN_PROP = "qiotests-regen"
LEFTOVER_OUT = "qiotests_leftovers"


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        config.stash[ENV_KEY] = Environment.from_json(workerinput[WORKER_ENV])
        return
    explicit = {r.key: config.getoption(f"qio_{r.key}") for r in ROLES}
    try:
        config.stash[ENV_KEY] = Environment.discover(
            explicit, config.getoption("qio_build"), config.getoption("qio_accel"), os.environ)
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[REGEN_KEY] = RegenStore()
    if config.getoption("qio_keep"):
        config.option.tmp_path_retention_policy = "all"
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistController(config), "qiotests-xdist")


class _XdistController:
    """Hands the environment to each worker and hears about leftover processes."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[WORKER_ENV] = self.config.stash[ENV_KEY].to_json()

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        left = getattr(node, "workeroutput", {}).get(LEFTOVER_OUT, [])
        if left:
            _report_leftovers(self.config, left)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return config.stash[ENV_KEY].header_lines()


@pytest.fixture
def qio_env(request: pytest.FixtureRequest) -> Environment:
    return request.config.stash[ENV_KEY]


@pytest.fixture
def qio(request: pytest.FixtureRequest, tmp_path: Path, qio_env: Environment) -> Iterator[Case]:
    """The test's case context: scratch dir, transcript, qemu-img/qemu-io, VMs."""
    case = Case(qio_env, tmp_path)
    request.node.stash[CASE_KEY] = case
    yield case
    rep = getattr(request.node, "qio_call_report", None)
    problems = case.close(failed=bool(rep is not None and rep.failed))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """After the body: a VM that died unasked fails the test, then the golden check."""
    result = yield
    case = item.stash.get(CASE_KEY, None)
    if case is None:
        return result
    case.check_machines()
    module = Path(str(item.path))
    golden = golden_path_for(module, EXPECTED_DIR)
    name = section_name(item.nodeid)
    text = case.log.text()
    if item.config.getoption("qio_regen"):
        if text:
            item.user_properties.append((REGEN_PROP, (str(golden), name, text)))
        return result
    if text or _has_section(golden, name):
        compare(golden, name, text, case.scratch / f"{golden.stem}.out.actual",
                label=os.path.relpath(golden, item.config.rootpath))
    return result


def _has_section(golden: Path, name: str) -> bool:
    from harness.golden import GoldenFile

    return name in GoldenFile.load(golden).sections


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.qio_call_report = rep  # type: ignore[attr-defined]
    if rep.failed and call.excinfo is not None and call.excinfo.errisinstance(HarnessError):
        rep.longrepr = harness_failure_report(call.excinfo, Path(str(item.path)))
    return rep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get("config")
    if config is None or REGEN_KEY not in config.stash or report.when != "call":
        return
    for key, value in report.user_properties:
        if key == REGEN_PROP and report.passed:
            path, name, text = value
            config.stash[REGEN_KEY].record(Path(path), name, text)


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    left = [f"{pid} {label}" for pid, label in REGISTRY.kill_all()]
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[LEFTOVER_OUT] = left
        return
    if left:
        _report_leftovers(config, left)
    if config.stash.get(LEFTOVER_KEY, []):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if REGEN_KEY in config.stash:
        written = config.stash[REGEN_KEY].write_all()
        tr = config.pluginmanager.get_plugin("terminalreporter")
        for path, changed in written:
            if tr is not None:
                what = ", ".join(changed) if changed else "no change"
                tr.write_line(f"regen: {path}: {what}")


LEFTOVER_KEY = pytest.StashKey[list[str]]()


def _report_leftovers(config: pytest.Config, left: list[str]) -> None:
    """A QEMU outliving the session is a harness bug: say so and fail the run."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("QEMU processes started by the harness were still running at the end "
                      "of the session (killed now): " + "; ".join(left), red=True)
    config.stash.setdefault(LEFTOVER_KEY, []).extend(left)
