"""harness.binaries: where the programs come from, and which accelerator a run uses.

Discovery is tested with tiny shell scripts standing in for QEMU programs; probing once
against the real QEMU on PATH and against fake ones that misbehave.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from harness import binaries
from harness.binaries import (
    ROLES,
    KvmStatus,
    Probe,
    Role,
    find_binaries,
    list_accelerators,
    probe,
    probe_kvm,
    resolve_accel,
)
from harness.errors import ConfigError
from harness.session import Environment
from tests.conftest import HANGING_WITH_CHILD, fake_program, unpacked_qemu, wait_pid_gone

REQUIRED = ("qemu-system-x86_64", "qemu-img", "qemu-io")
ALL = (*REQUIRED, "qemu-nbd", "qemu-storage-daemon")
QEMU_10 = unpacked_qemu()


def fake_set(d: Path, names: tuple[str, ...] = REQUIRED) -> Path:
    for name in names:
        fake_program(d / name)
    return d.resolve()


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    """Four places holding a full set of fake programs, one per discovery layer."""
    return {layer: fake_set(tmp_path / layer) for layer in ("option", "env", "build", "path")}


def test_discovery_order(layers: dict[str, Path]) -> None:
    option = {"system": str(layers["option"] / "qemu-system-x86_64")}
    env = {"QEMU_PROG": str(layers["env"] / "qemu-system-x86_64"),
           "QEMU_IMG_PROG": str(layers["env"] / "qemu-img"),
           "PATH": str(layers["path"])}
    build = str(layers["build"])

    b = find_binaries(option, build, env)
    assert b.programs["system"].path == str(layers["option"] / "qemu-system-x86_64")
    assert b.programs["system"].source == "--qemu option"
    assert b.programs["img"].path == str(layers["env"] / "qemu-img")
    assert b.programs["img"].source == "QEMU_IMG_PROG environment variable"
    assert b.programs["io"].path == str(layers["build"] / "qemu-io")
    assert b.programs["io"].source.startswith("build dir ")

    b = find_binaries({}, build, env)
    assert b.path("system") == str(layers["env"] / "qemu-system-x86_64")

    b = find_binaries({}, build, {"PATH": str(layers["path"])})
    assert b.path("system") == str(layers["build"] / "qemu-system-x86_64")

    b = find_binaries({"system": None}, None, {"PATH": str(layers["path"])})
    assert b.path("system") == str(layers["path"] / "qemu-system-x86_64")
    assert b.programs["system"].source == "PATH"
    assert not b.has("nbd") and b.missing_required() == []


@pytest.mark.parametrize(("role", "option"), [(r.key, r.option) for r in ROLES])
def test_option_naming_a_missing_file(role: str, option: str, layers: dict[str, Path],
                                      tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "prog")
    with pytest.raises(ConfigError) as ei:
        # even with every program on PATH: never a silent fallback
        find_binaries({role: missing}, None, {"PATH": str(layers["path"])})
    assert str(ei.value) == f"{option} {missing}: no executable file there"


@pytest.mark.parametrize("env_var", [r.env for r in ROLES])
def test_env_var_naming_a_missing_file(env_var: str, layers: dict[str, Path],
                                       tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "prog")
    with pytest.raises(ConfigError) as ei:
        find_binaries({}, str(layers["build"]), {env_var: missing, "PATH": str(layers["path"])})
    assert str(ei.value) == f"{env_var}={missing}: no executable file there"


def test_a_file_that_is_not_executable_is_missing(tmp_path: Path) -> None:
    plain = tmp_path / "qemu-img"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match=r"--qemu-img .*qemu-img: no executable file there"):
        find_binaries({"img": str(plain)}, None, {"PATH": ""})
    with pytest.raises(ConfigError, match="QEMU_IMG_PROG="):
        find_binaries({}, None, {"QEMU_IMG_PROG": str(tmp_path), "PATH": ""})  # a directory


def test_env_var_with_a_bare_name_is_looked_up(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_set(tmp_path / "bin", ("qemu-system-x86_64-custom",))
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ.get('PATH', '')}")
    b = find_binaries({}, None, {"QEMU_PROG": "qemu-system-x86_64-custom", "PATH": str(d)})
    assert b.path("system") == str(d / "qemu-system-x86_64-custom")


def test_env_var_with_a_bare_name_uses_the_given_path(tmp_path: Path) -> None:
    d = fake_set(tmp_path / "bin", ("qemu-system-x86_64-custom",))
    b = find_binaries({}, None, {"QEMU_PROG": "qemu-system-x86_64-custom", "PATH": str(d)})
    assert b.path("system") == str(d / "qemu-system-x86_64-custom")


def test_qemu_build_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        find_binaries({}, str(tmp_path / "no-build"), {"PATH": ""})
    assert str(ei.value) == f"--qemu-build {tmp_path / 'no-build'}: no such directory"


def test_qemu_build_without_qemu(tmp_path: Path, layers: dict[str, Path]) -> None:
    empty = tmp_path / "empty-build"
    (empty / "usr" / "bin").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^--qemu-build .*empty-build: no QEMU program in it"):
        # programs on PATH do not make an empty build dir acceptable
        find_binaries({}, str(empty), {"PATH": str(layers["path"])})


def test_unpacked_deb_layout(tmp_path: Path) -> None:
    root = tmp_path / "deb"
    fake_set(root / "usr" / "bin", ALL)
    b = find_binaries({}, str(root), {"PATH": ""})
    for role, name in zip(("system", "img", "io", "nbd", "storage_daemon"), ALL, strict=True):
        assert b.path(role) == str((root / "usr" / "bin" / name).resolve())
        assert b.programs[role].source == f"build dir {root}"


def test_build_tree_layout(tmp_path: Path) -> None:
    root = tmp_path / "build"
    fake_set(root, (*REQUIRED, "qemu-nbd"))
    fake_program(root / "storage-daemon" / "qemu-storage-daemon")
    b = find_binaries({}, str(root), {"PATH": ""})
    assert b.path("system") == str((root / "qemu-system-x86_64").resolve())
    assert b.path("nbd") == str((root / "qemu-nbd").resolve())
    assert b.path("storage_daemon") == str(
        (root / "storage-daemon" / "qemu-storage-daemon").resolve())


def test_real_unpacked_deb() -> None:
    if not (QEMU_10 / "usr" / "bin" / "qemu-system-x86_64").exists():
        pytest.skip(f"no unpacked QEMU in {QEMU_10} (make qemu-versions)")
    b = find_binaries({}, str(QEMU_10), {"PATH": os.environ.get("PATH", "")})
    assert b.path("system").startswith(str(QEMU_10.resolve()))
    assert b.path("img") == str((QEMU_10 / "usr" / "bin" / "qemu-img").resolve())


def test_missing_program_error_says_how_to_fix_it(tmp_path: Path) -> None:
    d = fake_set(tmp_path / "bin")
    b = find_binaries({}, None, {"PATH": str(d)})
    assert not b.has("nbd")
    with pytest.raises(ConfigError) as ei:
        b.path("nbd")
    assert str(ei.value).startswith("qemu-nbd was not found (not in PATH); set --qemu-nbd or "
                                    "QEMU_NBD_PROG")
    b = find_binaries({}, None, {"PATH": str(tmp_path / "nothing")})
    assert b.missing_required() == list(REQUIRED)


def fake_probe(accels: tuple[str, ...] = ("tcg", "kvm"), kvm: bool = False,
               reason: str = "/dev/kvm cannot be opened (Permission denied)") -> Probe:
    return Probe(version="7.2.22", package="Debian", accelerators=accels,
                 kvm=KvmStatus(kvm, reason), commands=frozenset({"query-version"}), schema=())


def test_resolve_accel_auto() -> None:
    assert resolve_accel("auto", fake_probe(kvm=True, reason="ran")) == (
        "kvm", "kvm (auto: KVM is usable)")
    accel, note = resolve_accel("auto", fake_probe(kvm=False))
    assert accel == "tcg"
    assert note == "tcg (auto: KVM not usable: /dev/kvm cannot be opened (Permission denied))"
    with pytest.raises(ConfigError, match="KVM is not usable and this QEMU has no TCG"):
        resolve_accel("auto", fake_probe(accels=("kvm",), kvm=False))


def test_resolve_accel_kvm() -> None:
    assert resolve_accel("kvm", fake_probe(kvm=True)) == ("kvm", "kvm")
    with pytest.raises(ConfigError) as ei:
        resolve_accel("kvm", fake_probe(kvm=False, reason="the test guest hung"))
    assert str(ei.value) == "--accel kvm: KVM is not usable on this machine: the test guest hung"


def test_resolve_accel_tcg_and_qtest() -> None:
    assert resolve_accel("tcg", fake_probe()) == ("tcg", "tcg")
    assert resolve_accel("qtest", fake_probe(accels=("tcg", "qtest"))) == ("qtest", "qtest")
    with pytest.raises(ConfigError) as ei:
        resolve_accel("qtest", fake_probe(accels=("tcg", "kvm")))
    assert str(ei.value) == "--accel qtest: this QEMU has no qtest accelerator (it has: tcg, kvm)"
    with pytest.raises(ConfigError, match="no tcg accelerator"):
        resolve_accel("tcg", fake_probe(accels=("kvm",), kvm=True))


def test_list_accelerators_parses_qemus_help(tmp_path: Path) -> None:
    qemu = fake_program(tmp_path / "qemu-system-x86_64",
                        'printf "Accelerators supported in QEMU binary:\\ntcg\\nkvm\\n"')
    assert list_accelerators(str(qemu)) == ("tcg", "kvm")
    broken = fake_program(tmp_path / "broken", 'echo "no such option" >&2; exit 1')
    with pytest.raises(ConfigError, match="-accel help failed: no such option"):
        list_accelerators(str(broken))


def test_probe_of_a_program_that_is_not_qemu(tmp_path: Path) -> None:
    fake = fake_set(tmp_path / "bin", ("qemu-img", "qemu-io"))
    fake_program(fake / "qemu-system-x86_64", "exit 0")  # like /bin/true
    b = find_binaries({}, None, {"PATH": str(fake)})
    with pytest.raises(ConfigError):
        probe(b)


def test_probe_of_a_qemu_that_cannot_start_a_vm(tmp_path: Path) -> None:
    script = """
if [ "$1" = "--version" ]; then echo "QEMU emulator version 0.0.0 (fake)"; exit 0; fi
if [ "$1" = "-accel" ]; then printf "Accelerators supported in QEMU binary:\\ntcg\\n"; exit 0; fi
echo "fake-qemu: cannot initialise the machine" >&2
exit 1
"""
    fake = fake_set(tmp_path / "bin", ("qemu-img", "qemu-io"))
    fake_program(fake / "qemu-system-x86_64", script)
    b = find_binaries({}, None, {"PATH": str(fake)})
    with pytest.raises(ConfigError) as ei:
        probe(b)
    msg = str(ei.value)
    assert msg.startswith(f"{fake / 'qemu-system-x86_64'} does not start a VM")
    assert "fake-qemu: cannot initialise the machine" in msg


def test_probe_of_the_real_qemu_and_its_json_round_trip() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not on PATH")
    b = find_binaries({}, None, os.environ)
    p = probe(b)
    assert p.version_tuple >= (2, 10)
    assert "tcg" in p.accelerators
    assert p.has_command("blockdev-add") and not p.has_command("no-such-command")
    assert {"node", "name", "persistent"} <= p.command_args("block-dirty-bitmap-add")
    assert Probe.from_json(p.to_json()) == p
    accel, note = resolve_accel("auto", p)
    env = Environment(b, p, accel, note)
    again = Environment.from_json(env.to_json())
    assert again == env
    header = env.header_lines()
    assert header[0].startswith(f"qemu: {p.version} (")
    assert header[1] == f"accel: {note}"
    assert f"  qemu-system-x86_64: {b.path('system')} [PATH]" in header


FAKE_KVM_QEMU = """
case "$*" in *"-accel help"*)
    printf "Accelerators supported in QEMU binary:\\ntcg\\nkvm\\n"; exit 0;; esac
case "$*" in *"-accel kvm"*)
    echo "qemu-system-x86_64: -accel kvm: Could not access KVM kernel module: No such device" >&2
    exit 1;; esac
exec qemu-system-x86_64 "$@"
"""


def test_kvm_reason_keeps_qemus_own_words(tmp_path: Path) -> None:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        pytest.skip(f"/dev/kvm cannot be opened here ({e.strerror}): probe_kvm stops before "
                    "starting QEMU")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not on PATH")
    fake = fake_program(tmp_path / "qemu-system-x86_64", FAKE_KVM_QEMU)
    status = probe_kvm(str(fake), ("tcg", "kvm"), tmp_path)
    assert not status.usable
    assert "Could not access KVM kernel module: No such device" in status.reason


def test_build_dir_fallback_to_path_is_visible(tmp_path: Path) -> None:
    """A program missing from --qemu-build comes from PATH, and its source says so: mixing
    two QEMU versions in one run must never be silent."""
    build = fake_set(tmp_path / "build", REQUIRED)
    path = fake_set(tmp_path / "path", ALL)
    b = find_binaries({}, str(build), {"PATH": str(path)})
    assert b.programs["system"].source == f"build dir {build}"
    assert b.programs["nbd"].source == "PATH: not in the build dir"


def test_a_probe_that_hangs_is_one_sentence_and_kills_its_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 item 1: ``-accel help`` hanging (with a child) used to wait 30 s and let
    subprocess.TimeoutExpired escape, leaving the child running."""
    pidfile = tmp_path / "child.pid"
    real = shutil.which("qemu-system-x86_64") or "/bin/false"
    fake = fake_program(tmp_path / "qemu-system-x86_64",
                        HANGING_WITH_CHILD.format(real=real, pidfile=pidfile))
    monkeypatch.setattr(binaries, "PROBE_TIMEOUT", 1.0, raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        list_accelerators(str(fake))
    assert time.monotonic() - start < 5
    assert str(ei.value) == (f"{fake} -accel help did not finish within 1 s; killed it and its "
                             "process group (is it a working QEMU program?)")
    assert wait_pid_gone(int(pidfile.read_text()))


def test_a_program_in_the_wrong_role_is_refused(tmp_path: Path) -> None:
    """Issue 9 item 3: --qemu-img naming qemu-io was accepted; 54 tests then failed."""
    io = shutil.which("qemu-io")
    img = shutil.which("qemu-img")
    if io is None or img is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not on PATH")
    b = find_binaries({"img": io}, None, os.environ)
    with pytest.raises(ConfigError, match=r"^--qemu-img \S+qemu-io is not qemu-img: it says "
                       r"'qemu-io version \d"):
        probe(b)
    b = find_binaries({"nbd": img}, None, os.environ)
    with pytest.raises(ConfigError, match=r"^--qemu-nbd \S+qemu-img is not qemu-nbd"):
        probe(b)
    silent = fake_program(tmp_path / "qemu-io", "exit 3")
    b = find_binaries({}, None, {**os.environ, "QEMU_IO_PROG": str(silent)})
    with pytest.raises(ConfigError, match=r"^QEMU_IO_PROG=\S+ is not qemu-io: '--version' "
                       r"printed nothing \(exit status 3\)$"):
        probe(b)


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.option)
def test_an_empty_option_is_an_error(role: Role, layers: dict[str, Path]) -> None:
    """Issue 9 item 3: ``--qemu=`` silently fell back to PATH."""
    with pytest.raises(ConfigError, match=f"^{role.option} is empty: give the path of "
                       f"{role.name}, or leave the option out$"):
        find_binaries({role.key: ""}, None, {"PATH": str(layers["path"])})
    with pytest.raises(ConfigError, match=r"^--qemu-build is empty"):
        find_binaries({}, "", {"PATH": str(layers["path"])})
