"""Coverage of QEMU's bitmap code: which lines and branches the suite reaches, and which not.

``qiotests coverage`` (``make coverage``) builds QEMU 7.2 with ``--enable-gcov``
(:mod:`harness.build`, source fetched as :mod:`harness.matrix` does), then twice: removes
every ``.gcda`` counter file, runs one suite against the build, and asks gcovr for line
and branch coverage of :data:`FILES`. The suites are ours (``pytest cases``) and upstream's
bitmap iotests from the same tree (:func:`upstream_bitmap_tests`), so the table puts them
side by side.

How gcov counts, and what that means here: each instrumented process adds its counters
to the ``.gcda`` files when it *exits normally* (``exit()``, ``main`` returning), under a
file lock, so several QEMUs at once (``-n 2``, a source and a destination VM) add up
correctly. A process killed by a signal it does not handle (SIGKILL: the crash cases)
writes nothing: what it executed is missing from the figures. The harness keeps that kill
(a crash is what those cases test; SIGTERM would make QEMU store its bitmaps and change the
scenario), so the table undercounts what the crash cases reach; the report says so.

Only the CLI prints; this module returns data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import ConfigError

#: QEMU's bitmap code, relative to the source tree
FILES = (
    "block/qcow2-bitmap.c", "block/dirty-bitmap.c", "util/hbitmap.c", "block/backup.c",
    "block/copy-before-write.c", "block/monitor/bitmap-qmp-cmds.c",
    "migration/block-dirty-bitmap.c",
)
#: the QEMU whose code is measured (a :data:`harness.matrix.SOURCES` label)
LABEL = "7.2"
#: what makes an upstream iotest a bitmap test, besides "bitmap" in its name (7.2 has
#: no ``bitmaps`` group; newer trees may, and its members are taken too)
_BITMAP_USE = re.compile(r"block-dirty-bitmap|dirty-bitmap|qemu-img bitmap|bitmap-mode")
_GROUP = re.compile(r"^# group:(.*)$", re.MULTILINE)
#: the lines whose branches the second branch figure leaves out (gcovr's
#: ``--exclude-branches-by-pattern``, matched from the start of each source line): a call of
#: ``assert()`` (or ``g_assert*()``) or ``trace_*()``. An assert's failing side is a crash,
#: which no passing test takes; a ``trace_*()`` call's branches test whether the trace event
#: is enabled, and tracing is off. The raw figure counts them and stays the headline.
ASSERT_TRACE_LINES = r"\s*(assert|g_assert\w*|trace_\w+)\s*\("
#: how the tables name that figure
NO_ASSERT_LABEL = "branches w/o assert/trace"
NO_ASSERT_NOTE = (f"\"{NO_ASSERT_LABEL}\" leaves out the branches on lines that call assert() "
                  "or trace_*() (gcovr --exclude-branches-by-pattern "
                  f"'{ASSERT_TRACE_LINES}'): an assert's failing side is a crash and "
                  "tracing is off, so no passing run takes those. \"branches\" counts "
                  "every branch gcov generates and is the headline figure.")
KILL_NOTE = ("A QEMU killed with SIGKILL (the crash cases) writes no .gcda: what it ran "
             "before the kill is not counted. Concurrent QEMUs add up (gcov locks the files).")


@dataclass
class FileCoverage:
    """One source file's figures, and where it is not covered."""

    path: str
    lines: tuple[int, int]              # covered, total
    branches: tuple[int, int]
    functions: tuple[int, int]
    #: the branches not on an assert/trace line (:data:`ASSERT_TRACE_LINES`); None when
    #: the report of that figure is missing (a report dir from before it existed)
    branches_no_assert: tuple[int, int] | None = None
    uncovered_functions: list[str] = field(default_factory=list)
    # (function, first line, last line) of each run of uncovered lines
    uncovered_lines: list[tuple[str, int, int]] = field(default_factory=list)

    @staticmethod
    def percent(pair: tuple[int, int]) -> float:
        covered, total = pair
        return 100.0 * covered / total if total else 100.0


def upstream_bitmap_tests(src: Path) -> list[str]:
    """The bitmap iotests of the tree at `src`: named "bitmap", in a ``bitmaps`` group, or
    using the bitmap QMP commands or ``qemu-img bitmap``; by name, as ``check`` takes them."""
    root = src / "tests" / "qemu-iotests"
    found: list[str] = []
    candidates = sorted(p for p in root.iterdir() if p.is_file() and re.fullmatch(r"\d+", p.name))
    if (root / "tests").is_dir():
        candidates += sorted(p for p in (root / "tests").iterdir()
                             if p.is_file() and "." not in p.name)
    for p in candidates:
        text = p.read_text(errors="replace")
        groups = " ".join(_GROUP.findall(text)).split()
        if "bitmap" in p.name or "bitmaps" in groups or _BITMAP_USE.search(text):
            found.append(p.name)  # check names tests/NAME by its name alone
    return found


def reset_counters(build: Path) -> int:
    """Remove every ``.gcda`` under `build` (the counters); returns how many there were."""
    n = 0
    for p in build.rglob("*.gcda"):
        p.unlink()
        n += 1
    return n


def gcovr_argvs(gcovr: str, src: Path, build: Path, out: Path) -> list[list[str]]:
    """The gcovr runs: the counters of `build`, only :data:`FILES`, read into
    ``coverage.json``; then from that the text reports (lines, branches) and the HTML.
    A second read of the same counters leaves out the branches of assert/trace lines
    (``coverage-no-assert.json``, ``branches-no-assert.txt``): gcovr applies exclusions
    only while it reads counters, never to a tracefile."""
    read = [gcovr, "--root", str(src), "--gcov-ignore-parse-errors=negative_hits.warn"]
    for f in FILES:
        read += ["--filter", re.escape(str(src / f)) + "$"]
    again = [gcovr, "--root", str(src), "--add-tracefile", str(out / "coverage.json")]
    return [
        [*read, "--json", str(out / "coverage.json"), str(build)],
        [*again, "--txt", str(out / "lines.txt"), "--html-details",
         str(out / "html" / "index.html")],
        [*again, "--txt", str(out / "branches.txt"), "--txt-metric", "branch"],
        [*read, "--exclude-branches-by-pattern", ASSERT_TRACE_LINES,
         "--json", str(out / "coverage-no-assert.json"),
         "--txt", str(out / "branches-no-assert.txt"), "--txt-metric", "branch", str(build)],
    ]


def run_gcovr(src: Path, build: Path, out: Path) -> list[FileCoverage]:
    """Run gcovr (the one next to this Python, else on PATH) and parse what it wrote."""
    gcovr = shutil.which("gcovr", path=str(Path(sys.executable).parent)) or shutil.which("gcovr")
    if gcovr is None:
        raise ConfigError("coverage: gcovr is not installed (`make setup` installs it into .venv)")
    (out / "html").mkdir(parents=True, exist_ok=True)
    with (out / "gcovr.log").open("w") as log:
        for argv in gcovr_argvs(gcovr, src, build, out):
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False,
                                    cwd=build, env={**os.environ, "LANG": "C", "LC_ALL": "C"}
                                    ).returncode
            if status != 0:
                raise ConfigError(f"coverage: gcovr failed (status {status}); see "
                                  f"{out / 'gcovr.log'}")
    return read_report(out)


def read_report(out: Path) -> list[FileCoverage]:
    """The figures of a report dir: ``coverage.json``, with the branch figure of
    ``coverage-no-assert.json`` beside them when that exists."""
    files = parse_gcovr_json(json.loads((out / "coverage.json").read_text()))
    filtered = out / "coverage-no-assert.json"
    if filtered.is_file():
        without = {f.path: f for f in parse_gcovr_json(json.loads(filtered.read_text()))}
        for f in files:
            if f.path in without:
                f.branches_no_assert = without[f.path].branches
    return files


def _runs(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive integers grouped: [3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    out: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def parse_gcovr_json(data: dict[str, object]) -> list[FileCoverage]:
    """gcovr's ``--json`` report as one :class:`FileCoverage` per file, in :data:`FILES`
    order; a file no process ran (no ``.gcno`` found) is absent."""
    by_path: dict[str, FileCoverage] = {}
    files = data.get("files")
    assert isinstance(files, list)
    for f in files:
        path = str(f["file"])
        lines = [ln for ln in f.get("lines", []) if not ln.get("gcovr/noncode")]
        # gcovr lists a line once per function instance; a line counts as covered once
        counts: dict[int, int] = {}
        func_of: dict[int, str] = {}
        branches: dict[tuple[int, int], int] = {}
        for ln in lines:
            no = int(ln["line_number"])
            counts[no] = counts.get(no, 0) + int(ln["count"])
            func_of.setdefault(no, str(ln.get("function_name") or "?"))
            for i, b in enumerate(ln.get("branches", [])):
                if b.get("gcovr/excluded"):
                    continue  # left out by an --exclude-branches-by-pattern read
                branches[(no, i)] = branches.get((no, i), 0) + int(b["count"])
        funcs: dict[str, int] = {}
        for fn in f.get("functions", []):
            name = str(fn.get("demangled_name") or fn["name"])
            funcs[name] = funcs.get(name, 0) + int(fn["execution_count"])
        uncovered = [no for no, c in counts.items() if c == 0]
        cov = FileCoverage(
            path=path,
            lines=(len(counts) - len(uncovered), len(counts)),
            branches=(sum(1 for c in branches.values() if c), len(branches)),
            functions=(sum(1 for c in funcs.values() if c), len(funcs)),
            uncovered_functions=sorted(n for n, c in funcs.items() if c == 0),
        )
        for first, last in _runs(uncovered):
            cov.uncovered_lines.append((func_of[first], first, last))
        by_path[path] = cov
    return [by_path[p] for p in FILES if p in by_path]


def total(files: Sequence[FileCoverage]) -> FileCoverage:
    """All files together, as one row."""
    def add(key: str) -> tuple[int, int]:
        pairs = [getattr(f, key) for f in files]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    filtered = [f.branches_no_assert for f in files]
    no_assert = None if None in filtered else (sum(p[0] for p in filtered if p),
                                               sum(p[1] for p in filtered if p))
    return FileCoverage("total", add("lines"), add("branches"), add("functions"),
                        branches_no_assert=no_assert)


def _cell(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return "-"
    return f"{FileCoverage.percent(pair):.1f} % ({pair[0]}/{pair[1]})"


def table(columns: Sequence[tuple[str, Sequence[FileCoverage]]]) -> str:
    """A markdown table: one row per file (and the total); per suite lines, branches (raw,
    every branch gcov counts) and branches without those of assert/trace lines."""
    head = "| file | " + " | ".join(f"{name}: lines | {name}: branches | "
                                    f"{name}: {NO_ASSERT_LABEL}" for name, _ in columns)
    out = [head + " |", "|" + " --- |" * (1 + 3 * len(columns))]
    for path in [*FILES, "total"]:
        cells = [f"`{path}`" if path != "total" else "**total**"]
        for _, files in columns:
            row = total(files) if path == "total" else next(
                (f for f in files if f.path == path), None)
            if row is None:
                cells += ["-", "-", "-"]
                continue
            cells += [_cell(row.lines), _cell(row.branches), _cell(row.branches_no_assert)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def uncovered_text(files: Sequence[FileCoverage], max_runs: int = 400) -> str:
    """Per file: the functions never entered, then each run of lines never run, by function."""
    out: list[str] = []
    for f in files:
        out.append(f"### `{f.path}`: {len(f.uncovered_lines)} uncovered runs of lines\n")
        if f.uncovered_functions:
            out.append("Functions never entered: "
                       + ", ".join(f"`{n}`" for n in f.uncovered_functions) + "\n")
        by_func: dict[str, list[str]] = {}
        for func, first, last in f.uncovered_lines[:max_runs]:
            by_func.setdefault(func, []).append(str(first) if first == last
                                                else f"{first}-{last}")
        for func, spans in by_func.items():
            out.append(f"- `{func}`: {', '.join(spans)}")
        out.append("")
    return "\n".join(out) + "\n"


def run_ours(build: Path, repo: Path, out: Path, jobs: int,
             pytest_args: Sequence[str]) -> int:
    """``pytest cases`` against the gcov build (only the case files or test ids among
    ``pytest_args`` when it names some); its output in ``out/pytest.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    named = [a for a in pytest_args if (repo / a.split("::")[0]).exists()]
    argv = [sys.executable, "-m", "pytest", *([] if named else ["cases"]), "-n", str(jobs),
            "-p", "no:cacheprovider", "--qemu-build", str(build), "-rfEX", *pytest_args]
    with (out / "pytest.txt").open("w") as f:
        return subprocess.run(argv, cwd=repo, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False).returncode


def run_upstream(src: Path, build: Path, out: Path, tests: Sequence[str], jobs: int) -> int:
    """The tree's own ``check -qcow2 TESTS`` from the build dir (which the iotests find
    their programs by); scratch files in ``out/scratch``, output in ``out/iotests.txt``."""
    iotests = build / "tests" / "qemu-iotests"
    if not (iotests / "check").exists():
        raise ConfigError(f"coverage: {iotests / 'check'} is missing; is {build} a meson build "
                          f"of {src}?")
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    argv = ["./check", "-qcow2", *(["-j", str(jobs)] if jobs > 1 else []), *tests]
    env = {**os.environ, "TEST_DIR": str(scratch), "LANG": "C", "LC_ALL": "C"}
    with (out / "iotests.txt").open("w") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        status = subprocess.run(argv, cwd=iotests, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, check=False).returncode
    shutil.rmtree(scratch, ignore_errors=True)
    return status


def iotests_outcome(text: str) -> str:
    """check's last summary lines ("Not run: ...", "Failures: ...", "Passed all N ...")."""
    keep = [ln for ln in text.splitlines()
            if re.match(r"(Not run|Failures|Failed|Passed all|Some cases not run)", ln)]
    return "; ".join(keep) or "no summary line (see iotests.txt)"


def pytest_outcome(text: str) -> str:
    """pytest's final ``=== N passed, ... in S s ===`` line."""
    lines = [ln.strip("= ") for ln in text.splitlines()
             if re.match(r"=+ .*\d+ (passed|failed)", ln)]
    return lines[-1] if lines else "no summary line (see pytest.txt)"
