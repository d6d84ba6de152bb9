"""The ``qiotests`` command. Only this module prints; the library returns data.

``qiotests doctor`` finds and probes the QEMU under test exactly as a test session would
(same options, same environment variables) and prints what it found. It exits 0 when the
suite can run, and 1 with one plain sentence when something required is missing.

``qiotests bisect --src TREE --good REV --bad REV [-- PYTEST_ARGS]`` finds the QEMU commit
that broke the cases (``harness/bisect.py``); its exit status says how it ended:
0 found, 1 ambiguous (only untestable commits left), 2 refused (bad input), 3 an end does
not behave (GOOD fails, BAD passes, an end does not build), 4 the harness itself broke,
130 interrupted.

``qiotests guest build`` builds the test guest (a distro kernel and a busybox initramfs,
:mod:`harness.guest_image`) into its cache, or finds it there, and prints where it is; the
first guest case does the same by itself. Exit 0: ready; 1: a step failed (one sentence).

``qiotests build-qemu SRC [--build DIR] [--jobs N]`` builds the programs the harness runs
from a QEMU source tree (:mod:`harness.build`). Exit 0: built, and ``--qemu-build DIR``
works; 1: configure or the build failed, after printing the first compiler error as one
block (``git bisect run`` callers map that to "skip"); 2: bad arguments or a build dir
that is not ours.

``qiotests explore [--minutes N]`` runs the stateful exploration (:mod:`harness.explore`)
against the QEMU under test, with progress lines and a summary; a failure is printed as a
case to paste into ``cases/``. Exit 0: no failure; 1: a failure (the case is printed);
2: QEMU cannot be found or bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import bisect as bisect_mod
from harness import build as qbuild
from harness import matrix as qmatrix
from harness.binaries import ROLES
from harness.errors import ConfigError
from harness.session import Environment

INTERESTING_COMMANDS = (
    "blockdev-add", "blockdev-del", "blockdev-reopen", "x-blockdev-reopen",
    "blockdev-snapshot", "blockdev-snapshot-sync", "block-commit", "blockdev-backup",
    "block-dirty-bitmap-add", "block-dirty-bitmap-merge", "block-dirty-bitmap-populate",
    "x-debug-block-dirty-bitmap-sha256", "nbd-server-start", "block-export-add",
    "job-complete", "query-jobs",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qiotests", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="show the QEMU under test and what it can do")
    for role in ROLES:
        doc.add_argument(role.option, dest=role.key, metavar="PATH")
    doc.add_argument("--qemu-build", dest="build", metavar="DIR")
    doc.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg", "qtest"))
    doc.add_argument("--commands", action="store_true", help="list every QMP command")
    bis = sub.add_parser(
        "bisect", help="find the QEMU commit that broke the cases (git bisect run)",
        usage="qiotests bisect --src TREE --good REV --bad REV [options] [-- PYTEST_ARGS]",
        description="Build each commit, run the tests failing at BAD, name the first bad "
        "commit. PYTEST_ARGS (after --) choose and configure the run at BAD (default: "
        "cases); run from the qiotests checkout. Exit status: 0 found, 1 ambiguous, "
        "2 refused, 3 an end does not behave, 4 harness broken, 130 interrupted.")
    bis.add_argument("--src", required=True, metavar="TREE", help="QEMU git work tree")
    bis.add_argument("--good", required=True, metavar="REV", help="a commit that passes")
    bis.add_argument("--bad", required=True, metavar="REV", help="a commit that fails")
    bis.add_argument("--build", metavar="DIR", help="build dir (default: WORKDIR/build)")
    bis.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="a commit is good only after N clean runs (for intermittent bugs)")
    bis.add_argument("--workdir", metavar="DIR",
                     help="logs and build (default: ~/.cache/qiotests/bisect/TREE-NAME)")
    bis.add_argument("--build-cmd", metavar="CMD",
                     help="build command, {src} and {build} filled in (default: qiotests "
                     "build-qemu {src} --build {build})")
    b = sub.add_parser("build-qemu", help="build the programs the harness runs from a QEMU tree")
    b.add_argument("src", metavar="SRC", type=Path, help="QEMU source tree (git or Debian)")
    b.add_argument("--build", type=Path, metavar="DIR",
                   help="build dir, reused when it was made for SRC (default: SRC-build)")
    b.add_argument("--jobs", type=int, metavar="N", help="ninja -j (default: ninja's choice)")
    b.add_argument("--no-install-deps", dest="install_deps", action="store_false",
                   help="do not check for (or apt-get install) the build dependencies")
    b.add_argument("--verbose", "-v", action="store_true",
                   help="show every configure and ninja line, not only progress")
    b.add_argument("--gcov", action="store_true",
                   help="instrument for coverage (--enable-gcov): .gcda files in the build dir")
    m = sub.add_parser("qemu-matrix", help="fetch, build and test Debian's QEMU sources",
                       usage="qiotests qemu-matrix [options] [-- PYTEST_ARGS]")
    m.add_argument("--dir", type=Path, metavar="DIR",
                   help="the cache (default: $QEMU_MATRIX_DIR, else ../qemu-matrix)")
    m.add_argument("--only", action="append", default=[], metavar="LABEL",
                   help="only this row (repeatable); rows: "
                   + ", ".join(label for _, label in qmatrix.SOURCES))
    m.add_argument("--jobs", type=int, default=2, metavar="N", help="pytest -n (default 2)")
    m.add_argument("--fetch-only", action="store_true",
                   help="only fetch (or reuse) the sources into DIR/src")
    c = sub.add_parser("coverage", help="line and branch coverage of QEMU's bitmap code",
                       usage="qiotests coverage [options] [-- PYTEST_ARGS]")
    c.add_argument("--dir", type=Path, metavar="DIR",
                   help="build and reports (default: $QEMU_COVERAGE_DIR, else ../qemu-coverage)")
    c.add_argument("--matrix-dir", type=Path, metavar="DIR",
                   help="where the 7.2 source is fetched (default: $QEMU_MATRIX_DIR, else "
                   "../qemu-matrix)")
    c.add_argument("--suite", action="append", choices=("qiotests", "upstream"), default=[],
                   help="only this suite (repeatable; default both)")
    c.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="pytest -n and check -j (default 2)")
    e = sub.add_parser("explore", help="stateful exploration of bitmaps with Hypothesis")
    for role in ROLES:
        e.add_argument(role.option, dest=role.key, metavar="PATH")
    e.add_argument("--qemu-build", dest="build", metavar="DIR")
    e.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg", "qtest"))
    e.add_argument("--minutes", type=float, default=0.0, metavar="N",
                   help="explore for N minutes in batches of --examples (default: one batch)")
    e.add_argument("--examples", type=int, default=20, metavar="N",
                   help="sequences per batch; the time is checked between batches "
                   "(default 20)")
    e.add_argument("--steps", type=int, default=30, metavar="N",
                   help="at most N steps per sequence (default 30)")
    e.add_argument("--derandomize", action="store_true",
                   help="the fixed sequences make check runs, not random ones")
    e.add_argument("--database", type=Path, metavar="DIR",
                   help="the example database (default: ~/.cache/qiotests/explore/VERSION)")
    e.add_argument("--scratch", type=Path, metavar="DIR",
                   help="where examples run (default: a new dir in /tmp, kept on failure)")
    g = sub.add_parser("guest", help="the Linux guest of the guest cases")
    gsub = g.add_subparsers(dest="guest_command", required=True)
    gb = gsub.add_parser("build", help="download a kernel and busybox with apt-get download, "
                         "build the initramfs, cache both (or find them cached)")
    gb.add_argument("--cache", type=Path, metavar="DIR",
                    help="cache root (default: ~/.cache/qiotests/guest)")
    return p


def explore(args: argparse.Namespace) -> int:
    import tempfile

    from harness import explore as qexplore

    def say(line: str) -> None:
        print(f"explore: {line}", flush=True)

    if args.minutes < 0 or args.examples < 1 or args.steps < 1:
        print("qiotests explore: --minutes must be >= 0, --examples and --steps >= 1",
              file=sys.stderr)
        return 2
    explicit = {r.key: getattr(args, r.key) for r in ROLES}
    try:
        env = Environment.discover(explicit, args.build, args.accel, os.environ)
    except ConfigError as e:
        print(f"qiotests explore: {e}", file=sys.stderr)
        return 2
    db = args.database or qexplore.database_dir(env.probe.version)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="qiotests-explore-"))
    say(f"QEMU {env.probe.version} ({env.binaries.path('system')}), accel {env.accel}")
    say(f"example database {db}; scratch {scratch}")
    say(f"{'for ' + format(args.minutes, 'g') + ' min' if args.minutes else 'one batch'}: "
        f"{args.examples} sequences per batch, at most {args.steps} steps each")
    last = [0.0]

    def progress(ctx: qexplore.Context) -> None:
        now = time.monotonic()
        if now - last[0] < 10 and ctx.examples > 1:
            return
        last[0] = now
        took = now - ctx.started
        left = f", {max(0.0, args.minutes * 60 - took) / 60:.1f} min left" \
            if args.minutes else ""
        say(f"{ctx.examples} examples, {ctx.steps} steps, "
            f"{ctx.examples / took if took else 0:.2f} examples/s, "
            f"longest sequence {ctx.longest} steps{left}")

    budget = qexplore.Budget(examples=args.examples, steps=args.steps, minutes=args.minutes,
                             seed=0 if args.derandomize else None, database=db)
    out = qexplore.run(env, scratch, budget, progress)
    print(out.summary(), flush=True)
    if out.failure is not None:
        say(f"the failing example's files are in {scratch}")
        return 1
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0



def guest(args: argparse.Namespace) -> int:
    from harness.guest_image import GuestBuildError, ensure

    def say(line: str) -> None:
        print(f"guest: {line}", flush=True)

    try:
        files = ensure(say, args.cache.resolve() if args.cache else None)
    except GuestBuildError as e:
        print(f"qiotests guest build: {e}", file=sys.stderr)
        return 1
    print(f"kernel: {files.kernel}\ninitrd: {files.initrd}\nfrom:   {files.origin}")
    return 0


def coverage(args: argparse.Namespace, pytest_args: list[str]) -> int:
    from harness import coverage as qcov

    def say(line: str) -> None:
        print(f"coverage: {line}", flush=True)

    root = (args.dir or Path(os.environ.get("QEMU_COVERAGE_DIR") or Path.cwd().parent
                             / "qemu-coverage")).resolve()
    mroot = (args.matrix_dir or Path(os.environ.get("QEMU_MATRIX_DIR") or Path.cwd().parent
                                     / "qemu-matrix")).resolve()
    for d in (root, mroot):
        if Path.cwd().resolve() in (d, *d.parents):
            print(f"coverage: {d} must be outside the repo", file=sys.stderr)
            return 2
    suites = args.suite or ["qiotests", "upstream"]
    try:
        layout = qmatrix.Layout(mroot)
        (row,) = qmatrix.select(qmatrix.rows(), [qcov.LABEL])
        (mroot / "logs").mkdir(parents=True, exist_ok=True)
        how = qmatrix.fetch(row, layout, mroot / "logs" / "fetch.log")
        src = layout.src(row.label)
        say(f"source {how}: {src}")
        build = root / "build"
        say(f"building with --enable-gcov in {build} (a first build takes 20-30 min)")
        result = qbuild.build_qemu(src, build, progress=_Progress(False), gcov=True)
        say(f"built {result.version_line} ({result.decision.value})")
        for suite in suites:
            out = root / suite
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            say(f"{suite}: {qcov.reset_counters(build)} counter files reset")
            if suite == "qiotests":
                qcov.run_ours(build, Path.cwd(), out, args.jobs, pytest_args)
                outcome = qcov.pytest_outcome((out / "pytest.txt").read_text(errors="replace"))
            else:
                tests = qcov.upstream_bitmap_tests(src)
                (out / "tests.txt").write_text("\n".join(tests) + "\n")
                say(f"upstream: {len(tests)} bitmap iotests: {' '.join(tests)}")
                qcov.run_upstream(src, build, out, tests, args.jobs)
                outcome = qcov.iotests_outcome((out / "iotests.txt").read_text(errors="replace"))
            say(f"{suite}: {outcome}")
            files = qcov.run_gcovr(src, build, out)
            (out / "uncovered.md").write_text(qcov.uncovered_text(files))
            (out / "outcome.txt").write_text(outcome + "\n")
            say(f"{suite}: reports in {out} (lines.txt, branches.txt, html/index.html, "
                "uncovered.md)")
    except qbuild.BuildError as e:
        print(f"coverage: {e}\n{e.first_error}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(str(e) if str(e).startswith("coverage:") else f"coverage: {e}", file=sys.stderr)
        return 2
    # every suite measured so far (a run of one suite keeps the other's column)
    columns = [(suite, qcov.read_report(root / suite))
               for suite in ("qiotests", "upstream") if (root / suite / "coverage.json").is_file()]
    outcomes = [f"- {suite}: " + (root / suite / "outcome.txt").read_text().strip()
                for suite, _ in columns]
    text = (f"# Coverage of QEMU {result.src.version}'s bitmap code\n\n"
            + qcov.table(columns) + "\n" + "\n".join(outcomes) + "\n\n" + qcov.NO_ASSERT_NOTE
            + "\n\n" + qcov.KILL_NOTE + "\n")
    (root / "coverage.md").write_text(text)
    print()
    print(text, end="")
    print(f"\n(also in {root / 'coverage.md'})")
    return 0


def qemu_matrix(args: argparse.Namespace, pytest_args: list[str]) -> int:
    root = (args.dir or Path(os.environ.get("QEMU_MATRIX_DIR") or Path.cwd().parent
                             / "qemu-matrix")).resolve()
    if Path.cwd().resolve() in (root, *root.parents):
        print(f"qemu-matrix: the cache {root} must be outside the repo", file=sys.stderr)
        return 2
    layout = qmatrix.Layout(root)
    try:
        selected = qmatrix.select(qmatrix.rows(), args.only)
        outcomes = qmatrix.run_matrix(layout, selected, args.jobs, pytest_args,
                                      Path.cwd(), lambda s: print(f"qemu-matrix: {s}",
                                                                  flush=True),
                                      fetch_only=args.fetch_only)
        if args.fetch_only:
            return 0
    except ConfigError as e:
        print(f"qemu-matrix: {e}", file=sys.stderr)
        return 2
    text = qmatrix.summary(outcomes)
    (root / "summary.md").write_text(text)
    print()
    print(text, end="")
    print(f"\n(also in {root / 'summary.md'}; pytest output in {root / 'results'})")
    return 0 if all(o.ok for o in outcomes) else 1


class _Progress:
    """Shows configure and ninja output sparsely: phase lines and every tenth of the steps."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.shown = -1

    def __call__(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)
            return
        if line.startswith("[") and "/" in line:
            done, _, rest = line[1:].partition("/")
            total = rest.partition("]")[0]
            if done.isdigit() and total.isdigit() and int(total):
                tenth = int(done) * 10 // int(total)
                if tenth > self.shown:
                    self.shown = tenth
                    print(f"build-qemu: ninja [{done}/{total}]", flush=True)


def build_qemu(args: argparse.Namespace) -> int:
    src: Path = args.src
    build: Path = args.build or src.resolve().with_name(src.resolve().name + "-build")
    say = "build-qemu:"
    t0 = time.monotonic()
    try:
        tree = qbuild.SourceTree.inspect(src)
        print(f"{say} source {tree.path}: QEMU {tree.version}"
              + (f", git describe {tree.git_describe}" if tree.git_describe else ""), flush=True)
        result = qbuild.build_qemu(src, build, args.jobs, _Progress(args.verbose),
                                    install_deps=args.install_deps, gcov=args.gcov)
    except qbuild.BuildError as e:
        print(f"{say} {e}", file=sys.stderr)
        print(f"{say} first error:", file=sys.stderr)
        for line in e.first_error.splitlines():
            print(f"    {line}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(str(e) if str(e).startswith(say) else f"{say} {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"{say} {note}")
    how = {qbuild.Reuse.REUSE: "reused (same tree, same flags): configure skipped",
           qbuild.Reuse.FRESH: "configured afresh",
           qbuild.Reuse.WIPE: "wiped (other tree or flags) and configured afresh"}
    print(f"{say} build dir {result.build}: {how[result.decision]}")
    cc = f"ccache {result.ccache}"
    if result.ccache_hits is not None and any(result.ccache_hits):
        hits, misses = result.ccache_hits
        cc += f", {hits} hits / {misses} misses ({100 * hits // (hits + misses)}%)"
    print(f"{say} {cc}")
    print(f"{say} configure {result.configure_seconds:.0f} s, ninja {result.ninja_seconds:.0f} s "
          f"({result.ninja_steps} steps), total {time.monotonic() - t0:.0f} s")
    print(f"{say} built {result.version_line}")
    print(f"{say} test it with: pytest cases --qemu-build {result.build}")
    return 0


def doctor(args: argparse.Namespace) -> int:
    explicit = {r.key: getattr(args, r.key) for r in ROLES}
    try:
        env = Environment.discover(explicit, args.build, args.accel, os.environ)
    except ConfigError as e:
        print(f"qiotests doctor: {e}", file=sys.stderr)
        return 1
    for line in env.header_lines():
        print(line)
    print(f"accelerators: {', '.join(env.probe.accelerators)}")
    print(f"kvm: {'usable' if env.probe.kvm.usable else 'not usable'}: {env.probe.kvm.reason}")
    print(f"qmp commands: {len(env.probe.commands)}")
    shown = sorted(env.probe.commands) if args.commands else INTERESTING_COMMANDS
    for c in shown:
        print(f"  {'+' if env.probe.has_command(c) else '-'} {c}")
    return 0


def bisect(args: argparse.Namespace, pytest_args: list[str]) -> int:
    def say(line: str) -> None:
        print(f"qiotests bisect: {line}", flush=True)

    try:
        result = bisect_mod.bisect(
            args.src, args.good, args.bad, pytest_args=pytest_args, build_dir=args.build,
            build_cmd=shlex.split(args.build_cmd) if args.build_cmd else None,
            repeat=args.repeat, workdir=args.workdir, progress=say)
    except ConfigError as e:
        print(f"qiotests bisect: {e}", file=sys.stderr)
        return bisect_mod.EXIT_CODES["refused"]
    print()
    print(report(result))
    return result.exit_code


def report(result: bisect_mod.Result, shown: int = 3, max_lines: int = 30) -> str:
    """The end of a bisect as a person reads it: verdict, tests, diffs, times, logs.

    Every failing test gets a line; the first ``shown`` also get their report (the diff,
    or pytest's ``E`` lines); summary.md in the run dir has all of them in full.
    """
    out = [f"qiotests bisect: {result.message}"]
    failures = sorted(result.failures, key=lambda f: f.test)
    if failures:
        out.append(f"failing tests ({len(failures)}):")
        out += [f"  {f.test}: {f.kind}: {f.detail[:160]}" for f in failures]
        # the reports of one test of each kind of failure first
        firsts = list({f.kind: f for f in reversed(failures)}.values())[::-1]
        for f in (firsts + [f for f in failures if f not in firsts])[:shown]:
            out.append(f"--- {f.test} ({f.kind})")
            text = f.text.rstrip().splitlines()
            e_lines = [ln for ln in text if ln.startswith("E ")]
            text = e_lines + [ln for ln in text[-1:] if ln not in e_lines] if e_lines else text
            out += ["    " + ln for ln in text[:max_lines]]
            if len(text) > max_lines:
                out.append(f"    ... {len(text) - max_lines} more lines")
        if len(failures) > shown:
            out.append(f"(all {len(failures)} reports in {result.run_dir}/summary.md)")
    steps = result.bisect_steps()
    if steps:
        skipped = sum(1 for s in steps if s.verdict == "skip")
        n = len(steps)
        out.append(f"steps: {n} tested by git bisect ({skipped} skipped), plus the two ends")
        build = sum(s.build_s for s in steps) / n
        tests = sum(s.tests_s for s in steps) / n
        out.append(f"per step (mean): build {build:.1f} s, tests {tests:.1f} s, "
                   f"overhead {result.overhead_per_step():.2f} s")
    if not result.reset_ok:
        out.append(f"WARNING: git bisect reset failed in {result.src}; run it by hand")
    out.append(f"wall time: {result.wall_s:.1f} s")
    out.append(f"logs: {result.run_dir} (result.json, summary.md, steps/)")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if argv and argv[0] in ("bisect", "qemu-matrix", "coverage") and "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1:]
    args = _parser().parse_args(argv)
    try:
        if args.command == "doctor":
            return doctor(args)
        if args.command == "bisect":
            return bisect(args, rest)
        if args.command == "build-qemu":
            return build_qemu(args)
        if args.command == "qemu-matrix":
            return qemu_matrix(args, rest)
        if args.command == "coverage":
            return coverage(args, rest)
        if args.command == "explore":
            return explore(args)
        if args.command == "guest":
            return guest(args)
    except BrokenPipeError:  # `qiotests doctor | head`
        sys.stderr.close()
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
