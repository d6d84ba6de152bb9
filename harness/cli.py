"""The ``qiotests`` command. Only this module prints; the library returns data.

``qiotests doctor`` finds and probes the QEMU under test exactly as a test session would
(same options, same environment variables) and prints what it found. It exits 0 when the
suite can run, and 1 with one plain sentence when something required is missing.

``qiotests bisect --src TREE --good REV --bad REV [-- PYTEST_ARGS]`` finds the QEMU commit
that broke the cases (``harness/bisect.py``); its exit status says how it ended:
0 found, 1 ambiguous (only untestable commits left), 2 refused (bad input), 3 an end does
not behave (GOOD fails, BAD passes, an end does not build), 4 the harness itself broke,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from harness import bisect as bisect_mod
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
    return p


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


def report(result: bisect_mod.Result, max_lines: int = 40) -> str:
    """The end of a bisect as a person reads it: verdict, tests, diffs, times, logs."""
    out = [f"qiotests bisect: {result.message}"]
    if result.failures:
        out.append("failing tests:")
        for f in result.failures:
            out.append(f"  {f.test}: {f.kind}: {f.detail}")
            text = f.text.rstrip().splitlines()
            if text and text[0].strip() == f.detail:
                text = text[1:]
            out += ["    " + ln for ln in text[:max_lines]]
            if len(text) > max_lines:
                out.append(f"    ... {len(text) - max_lines} more lines in the step's logs")
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
    if argv and argv[0] == "bisect" and "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1:]
    args = _parser().parse_args(argv)
    try:
        if args.command == "doctor":
            return doctor(args)
        if args.command == "bisect":
            return bisect(args, rest)
    except BrokenPipeError:  # `qiotests doctor | head`
        sys.stderr.close()
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
