"""The ``qiotests`` command. Only this module prints; the library returns data.

``qiotests doctor`` finds and probes the QEMU under test exactly as a test session would
(same options, same environment variables) and prints what it found. It exits 0 when the
suite can run, and 1 with one plain sentence when something required is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "doctor":
            return doctor(args)
    except BrokenPipeError:  # `qiotests doctor | head`
        sys.stderr.close()
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
