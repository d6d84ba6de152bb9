"""Pytest wiring shared by the cases and the self-tests: command-line options only.

The case fixtures and hooks live in ``cases/conftest.py``, so ``pytest tests`` (the
harness's own tests) never needs a QEMU to start.
"""

from __future__ import annotations

import pytest

from harness.binaries import ROLES


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
    group.addoption("--regen", dest="qio_regen", action="store_true",
                    help="rewrite the golden sections of the tests that run")
    group.addoption("--keep-scratch", dest="qio_keep", action="store_true",
                    help="keep every test's scratch dir (default: only failed tests')")
