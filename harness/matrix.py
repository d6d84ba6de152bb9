"""The QEMU version matrix: Debian's QEMU sources fetched, built and tested, one per row.

Each row of :data:`SOURCES` is one line, ``(suite or suite=version, label)``: ``bookworm``
means ``apt-get source qemu/bookworm`` with a ``deb-src`` line for bookworm, and
``sid=1:10.2.2+ds-1`` means ``apt-get source qemu=1:10.2.2+ds-1`` with a ``deb-src`` line
for sid. A newer source, once downloadable, is one more row.

The cache (``QEMU_MATRIX_DIR``, default ``../qemu-matrix`` beside the repo) holds
``src/LABEL/`` (the unpacked tree), ``src/.apt/LABEL/`` (what apt downloaded, reused to
re-unpack), ``build/LABEL/`` (reused by :mod:`harness.build`), ``results/LABEL.{txt,xml}``
(pytest's output and JUnit XML) and ``summary.md``.

Apt is never reconfigured: the ``deb-src`` line lives in a sources file of its own under
``apt/LABEL/`` with its own lists and cache dirs, passed to this one ``apt-get update`` and
``apt-get source`` with ``-o``, and removed afterwards, so the machine's apt state (and
other users of it) never see it.

Only the CLI prints; this module returns data (:class:`Outcome`, the summary text).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from harness import processes
from harness.errors import ConfigError

# (suite or suite=version, label): the rows of the matrix, oldest first
SOURCES: tuple[tuple[str, str], ...] = (
    ("bookworm", "7.2"),             # Debian 12: 7.2.x
    ("trixie", "10.0"),              # Debian 13: 10.0.13
    ("sid=1:10.2.2+ds-1", "10.2"),   # the newest whose source downloads here (sid's 11.1: 404)
)
MIRROR = "http://deb.debian.org/debian"
STOP_GRACE = 30.0  # seconds an interrupted pytest run gets to stop its VMs
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Row:
    """One matrix row: what to ask apt for, and the label its dirs are named by."""

    label: str
    suite: str
    version: str | None

    @classmethod
    def parse(cls, spec: str, label: str) -> Row:
        suite, _, version = spec.partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", suite) or not re.fullmatch(r"[\w.+-]+", label):
            raise ConfigError(f"matrix row ({spec!r}, {label!r}): want ('suite' or "
                              "'suite=version', 'label')")
        return cls(label=label, suite=suite, version=version or None)

    @property
    def apt_spec(self) -> str:
        """What ``apt-get source`` is asked for."""
        return f"qemu={self.version}" if self.version else f"qemu/{self.suite}"

    @property
    def deb_src(self) -> str:
        return f"deb-src [signed-by={KEYRING}] {MIRROR} {self.suite} main"


def rows(table: Sequence[tuple[str, str]] = SOURCES) -> list[Row]:
    """The table as rows; labels must be unique, as they name dirs."""
    out = [Row.parse(spec, label) for spec, label in table]
    labels = [r.label for r in out]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"matrix: label {sorted(dup)[0]!r} appears twice in the table")
    return out


def select(all_rows: Sequence[Row], only: Sequence[str]) -> list[Row]:
    """The rows named by `only` (all when empty); an unknown label is an error."""
    if not only:
        return list(all_rows)
    known = {r.label: r for r in all_rows}
    for label in only:
        if label not in known:
            raise ConfigError(f"matrix: no row labelled {label!r} (known: "
                              f"{', '.join(known)})")
    return [known[x] for x in only]


@dataclass(frozen=True)
class Layout:
    """The dirs of the matrix cache."""

    root: Path

    def src(self, label: str) -> Path:
        return self.root / "src" / label

    def downloads(self, label: str) -> Path:
        return self.root / "src" / ".apt" / label

    def build(self, label: str) -> Path:
        return self.root / "build" / label

    def results(self, label: str, suffix: str) -> Path:
        return self.root / "results" / f"{label}.{suffix}"

    def apt(self, label: str) -> Path:
        return self.root / "apt" / label


# ---------------------------------------------------------------------------------------
# fetching


def _apt_options(d: Path) -> list[str]:
    """apt options that confine an update and a source fetch to `d`."""
    return ["-o", f"Dir::Etc::sourcelist={d / 'sources.list'}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "APT::Get::List-Cleanup=0", "-q"]


def fetch(row: Row, layout: Layout, log: Path) -> str:
    """Make ``src/LABEL`` a QEMU tree: reuse it, re-unpack kept downloads, or apt-get source.

    Returns how (``"reused"``, ``"unpacked"``, ``"downloaded"``).
    """
    src = layout.src(row.label)
    if (src / "configure").is_file():
        return "reused"
    dl = layout.downloads(row.label)
    dl.mkdir(parents=True, exist_ok=True)
    for leftover in dl.iterdir():  # a tree half-unpacked by an interrupted run
        if leftover.is_dir():
            shutil.rmtree(leftover)
    how = "unpacked"
    dscs = sorted(dl.glob("*.dsc"))
    with log.open("ab") as f:
        if dscs:
            _run(["dpkg-source", "--no-check", "-x", dscs[-1].name], dl, f)
        else:
            how = "downloaded"
            d = layout.apt(row.label)
            for sub in ("lists/partial", "cache/archives/partial"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            (d / "sources.list").write_text(row.deb_src + "\n")
            try:
                _run(["apt-get", *_apt_options(d), "update"], dl, f)
                _run(["apt-get", *_apt_options(d), "source", row.apt_spec], dl, f)
            finally:
                (d / "sources.list").unlink(missing_ok=True)
    trees = [p for p in dl.iterdir() if p.is_dir() and (p / "configure").is_file()]
    if len(trees) != 1:
        raise ConfigError(f"matrix: apt-get source {row.apt_spec} left {len(trees)} QEMU "
                          f"trees in {dl}, want one (log: {log})")
    src.parent.mkdir(parents=True, exist_ok=True)
    trees[0].rename(src)
    return how


def _run(argv: list[str], cwd: Path, out: IO[bytes]) -> None:
    status = processes.run_logged(argv, out, cwd=cwd,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if status != 0:
        raise ConfigError(f"matrix: {' '.join(argv[:1] + argv[-2:])} failed "
                          f"(exit status {status}) in {cwd}")


# ---------------------------------------------------------------------------------------
# results


@dataclass
class Outcome:
    """What pytest said about the suite against one build."""

    label: str
    version: str = "?"
    passed: int = 0
    xpassed: int = 0
    failed: list[str] = field(default_factory=list)
    xfailed: list[tuple[str, str]] = field(default_factory=list)   # (test id, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (test id, reason)
    error: str = ""   # the build or the run itself failed: why

    @property
    def ok(self) -> bool:
        return not self.failed and not self.error


def _test_id(case: ET.Element) -> str:
    cls = case.get("classname", "")
    return f"{cls.replace('.', '/')}.py::{case.get('name', '?')}" if cls else case.get("name", "?")


def parse_junit(xml_text: str, label: str) -> Outcome:
    """An :class:`Outcome` from pytest's JUnit XML (XPASS counts as passed there)."""
    out = Outcome(label=label)
    root = ET.fromstring(xml_text)
    for case in root.iter("testcase"):
        tid = _test_id(case)
        fail = case.find("failure")
        err = case.find("error")
        skip = case.find("skipped")
        if fail is not None or err is not None:
            out.failed.append(tid)
        elif skip is not None:
            reason = skip.get("message", "")
            if skip.get("type") == "pytest.xfail":
                out.xfailed.append((tid, reason))
            else:
                out.skipped.append((tid, re.sub(r"^Skipped: ", "", reason)))
        else:
            out.passed += 1
    return out


_COUNT = re.compile(r"(\d+) (xpassed)")


def xpassed_count(pytest_output: str) -> int:
    """XPASS count from pytest's final summary line (JUnit XML cannot tell XPASS apart)."""
    lines = [ln for ln in pytest_output.splitlines() if ln.startswith("=") and " in " in ln]
    m = _COUNT.search(lines[-1]) if lines else None
    return int(m.group(1)) if m else 0


def summary(outcomes: Sequence[Outcome]) -> str:
    """The matrix as a Markdown table, then the skip and xfail reasons per version."""
    head = ["| version | passed | xpassed | skipped | xfailed | failed |",
            "| --- | --- | --- | --- | --- | --- |"]
    body = []
    for o in outcomes:
        if o.error:
            body.append(f"| {o.label} ({o.version}) | - | - | - | - | {o.error} |")
            continue
        body.append(f"| {o.label} ({o.version}) | {o.passed} | {o.xpassed} | "
                    f"{len(o.skipped)} | {len(o.xfailed)} | {len(o.failed)} |")
    notes = []
    for o in outcomes:
        for kind, items in (("skipped", o.skipped), ("xfailed", o.xfailed)):
            for tid, reason in items:
                notes.append(f"- {o.label} {kind} `{tid}`: {reason}")
        for tid in o.failed:
            notes.append(f"- {o.label} FAILED `{tid}`")
    return "\n".join(head + body + (["", *notes] if notes else [])) + "\n"


# ---------------------------------------------------------------------------------------
# the whole matrix

Say = Callable[[str], None]


@dataclass
class Timing:
    """How long one row's steps took, for the summary."""

    fetch: str = ""
    build_seconds: float = 0.0
    build_how: str = ""
    ccache: str = ""
    test_seconds: float = 0.0


def run_suite(row: Row, layout: Layout, jobs: int, pytest_args: Sequence[str],
              cwd: Path) -> Outcome:
    """``pytest cases -n JOBS --qemu-build build/LABEL`` with its output and JUnit XML kept."""
    xml = layout.results(row.label, "xml")
    txt = layout.results(row.label, "txt")
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "pytest", "cases", "-n", str(jobs), "-p", "no:cacheprovider",
            "--qemu-build", str(layout.build(row.label)), f"--junitxml={xml}", "-rfEX",
            *pytest_args]
    with txt.open("wb") as f:
        # SIGINT first when interrupted: the pytest run stops its VMs
        processes.run_logged(argv, f, label=f"pytest ({row.label})", cwd=cwd,
                             grace=STOP_GRACE)
    text = txt.read_text(errors="replace")
    if not xml.is_file():
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
        return Outcome(label=row.label, error=f"pytest did not run: {tail[0]} (see {txt})")
    out = parse_junit(xml.read_text(), row.label)
    out.xpassed = xpassed_count(text)
    out.passed -= out.xpassed
    return out


def run_matrix(layout: Layout, selected: Sequence[Row], jobs: int, pytest_args: Sequence[str],
               cwd: Path, say: Say, fetch_only: bool = False) -> list[Outcome]:
    """Fetch every row's source first, then build and test each; one :class:`Outcome` each."""
    from harness import build as qbuild

    log = layout.root / "logs" / "fetch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timings = {r.label: Timing() for r in selected}
    for row in selected:
        how = fetch(row, layout, log)
        timings[row.label].fetch = how
        say(f"{row.label}: source {how} in {layout.src(row.label)} ({row.apt_spec})")
    outcomes: list[Outcome] = []
    if fetch_only:
        return outcomes
    for row in selected:
        t0 = time.monotonic()
        try:
            result = qbuild.build_qemu(layout.src(row.label), layout.build(row.label))
        except qbuild.BuildError as e:
            say(f"{row.label}: {e}\n" + e.first_error)
            outcomes.append(Outcome(label=row.label, error=f"build failed: {e.log}"))
            continue
        t = timings[row.label]
        t.build_seconds = time.monotonic() - t0
        t.build_how = result.decision.value
        t.ccache = result.ccache
        if result.ccache_hits and any(result.ccache_hits):
            hits, misses = result.ccache_hits
            t.ccache += f", {hits}/{hits + misses} hits"
        say(f"{row.label}: built {result.version_line} in {t.build_seconds:.0f} s "
            f"(build dir {t.build_how}, ccache {t.ccache})")
        t0 = time.monotonic()
        outcome = run_suite(row, layout, jobs, pytest_args, cwd)
        outcome.version = result.src.version
        t.test_seconds = time.monotonic() - t0
        say(f"{row.label}: suite done in {t.test_seconds:.0f} s: {outcome.passed} passed, "
            f"{len(outcome.skipped)} skipped, {len(outcome.xfailed)} xfailed, "
            f"{len(outcome.failed)} failed (output: {layout.results(row.label, 'txt')})")
        outcomes.append(outcome)
    return outcomes
