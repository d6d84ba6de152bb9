"""Find the QEMU programs under test and probe what they can do.

Lookup order for each program, first hit wins:
  1. an explicit option (``--qemu``, ``--qemu-img``, ...),
  2. the iotests environment variable (``QEMU_PROG``, ``QEMU_IMG_PROG``, ...),
  3. a QEMU build tree (``--qemu-build DIR``; also an unpacked ``.deb`` tree with usr/bin),
  4. ``PATH``.
An explicit option or variable that names a missing file is an error, never a silent
fallback to ``PATH``: testing the wrong QEMU is worse than not testing.

Probing asks the binaries themselves (``query-version``, ``query-commands``,
``query-qmp-schema``, ``-accel help``) instead of comparing version numbers, and runs a
512-byte guest under KVM to find out whether KVM can really execute guest code (nested
virtualisation can open ``/dev/kvm`` and still hang the first instruction). It first asks
every program found for ``--version``: a ``--qemu-img`` naming qemu-io would otherwise be
accepted and fail every test one by one. Every probe has a bound (:data:`PROBE_TIMEOUT`); a
program that hangs is killed with its whole process group and named in one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import processes, tmpdirs
from harness.errors import ConfigError, HarnessError, describe_status

#: Seconds any one probe (``--version``, ``-accel help``, a QMP query) may take.
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Role:
    """One QEMU program the harness knows how to find."""

    key: str
    name: str
    env: str
    option: str
    required: bool
    subdirs: tuple[str, ...] = ("", "usr/bin")


ROLES: tuple[Role, ...] = (
    Role("system", "qemu-system-x86_64", "QEMU_PROG", "--qemu", True),
    Role("img", "qemu-img", "QEMU_IMG_PROG", "--qemu-img", True),
    Role("io", "qemu-io", "QEMU_IO_PROG", "--qemu-io", True),
    Role("nbd", "qemu-nbd", "QEMU_NBD_PROG", "--qemu-nbd", False),
    Role(
        "storage_daemon", "qemu-storage-daemon", "QSD_PROG", "--qemu-storage-daemon", False,
        ("", "storage-daemon", "usr/bin"),
    ),
)
ROLE_BY_KEY = {r.key: r for r in ROLES}


@dataclass(frozen=True)
class Program:
    """Where one program was found, and why there (for the report header and doctor)."""

    role: str
    path: str | None
    source: str

    @property
    def found(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class Binaries:
    """The set of QEMU programs one test session uses."""

    programs: dict[str, Program]

    def path(self, role: str) -> str:
        """The program's path; a clear error when it was not found."""
        prog = self.programs[role]
        if prog.path is None:
            r = ROLE_BY_KEY[role]
            raise ConfigError(
                f"{r.name} was not found ({prog.source}); set {r.option} or {r.env}, "
                "or install QEMU (apt-get install qemu-system-x86 qemu-utils)"
            )
        return prog.path

    def has(self, role: str) -> bool:
        return self.programs[role].found

    def missing_required(self) -> list[str]:
        return [r.name for r in ROLES if r.required and not self.programs[r.key].found]


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binaries(
    explicit: Mapping[str, str | None],
    build_dir: str | None,
    env: Mapping[str, str],
) -> Binaries:
    """Resolve every role by the documented order; explicit names must exist.

    ``explicit`` maps role keys to option values (None when the option was not given).
    """
    build: Path | None = None
    if build_dir is not None and not build_dir.strip():
        raise ConfigError("--qemu-build is empty: give a QEMU build directory, or leave the "
                          "option out")
    if build_dir:
        build = Path(build_dir).expanduser()
        if not build.is_dir():
            raise ConfigError(f"--qemu-build {build_dir}: no such directory")
    programs: dict[str, Program] = {}
    for role in ROLES:
        programs[role.key] = _find_one(role, explicit.get(role.key), build, env)
    if build is not None and not any(
        p.source.startswith("build dir") for p in programs.values()
    ):
        raise ConfigError(
            f"--qemu-build {build}: no QEMU program in it (looked for qemu-system-x86_64, "
            "qemu-img, qemu-io in the directory and in its usr/bin)"
        )
    return Binaries(programs)


def _find_one(
    role: Role, option: str | None, build: Path | None, env: Mapping[str, str]
) -> Program:
    if option is not None and not option.strip():
        # an empty value must not quietly mean "look in PATH": that tests another QEMU
        raise ConfigError(f"{role.option} is empty: give the path of {role.name}, or leave "
                          "the option out")
    if option:
        p = Path(option).expanduser()
        if not _executable(p):
            raise ConfigError(f"{role.option} {option}: no executable file there")
        return Program(role.key, str(p.resolve()), f"{role.option} option")
    if env.get(role.env):
        value = env[role.env]
        found = shutil.which(value, path=env.get("PATH")) if "/" not in value else value
        if not found or not _executable(Path(found)):
            raise ConfigError(f"{role.env}={value}: no executable file there")
        return Program(role.key, str(Path(found).resolve()), f"{role.env} environment variable")
    if build is not None:
        for sub in role.subdirs:
            cand = build / sub / role.name
            if _executable(cand):
                return Program(role.key, str(cand.resolve()), f"build dir {build}")
    found = shutil.which(role.name, path=env.get("PATH"))
    if found:
        # with a build dir, say loudly that this program comes from another QEMU
        source = "PATH: not in the build dir" if build is not None else "PATH"
        return Program(role.key, str(Path(found).resolve()), source)
    return Program(role.key, None, "not in the build dir or PATH" if build else "not in PATH")


# -- probing ------------------------------------------------------------------------------

#: A real-mode boot sector: writes "QIO-OK\n" to the debug port 0xe9, then halts. If it
#: never prints under KVM, KVM cannot run guest code here, whatever /dev/kvm says.
def _boot_sector() -> bytes:
    code = bytes([0xBA, 0xE9, 0x00])  # mov dx, 0xe9
    for ch in b"QIO-OK\n":
        code += bytes([0xB0, ch, 0xEE])  # mov al, ch; out dx, al
    code += bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
    return code + bytes(510 - len(code)) + b"\x55\xaa"


KVM_GUEST_DEADLINE = 5.0


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


@dataclass(frozen=True)
class Probe:
    """What the QEMU under test is and can do; plain data so it can travel to xdist workers."""

    version: str
    package: str
    accelerators: tuple[str, ...]
    kvm: KvmStatus
    commands: frozenset[str]
    schema: tuple[dict[str, Any], ...] = field(repr=False)

    def has_command(self, name: str) -> bool:
        return name in self.commands

    def command_args(self, command: str) -> frozenset[str]:
        """Names of a command's arguments, from the QMP schema ('' entries when unknown)."""
        by_name = {e.get("name"): e for e in self.schema}
        cmd = by_name.get(command)
        if not cmd or cmd.get("meta-type") != "command":
            return frozenset()
        arg_type = by_name.get(cmd.get("arg-type"))
        return self._member_names(arg_type, by_name)

    def has_argument(self, command: str, path: str) -> bool:
        """Whether ``command`` takes the argument ``path``: a member name, or a dotted
        path into nested objects and lists (``block-bitmap-mapping.bitmaps.transform``)."""
        by_name = {e.get("name"): e for e in self.schema}
        cmd = by_name.get(command)
        if not cmd or cmd.get("meta-type") != "command":
            return False
        types = [by_name.get(cmd.get("arg-type"), {})]
        for name in path.split("."):
            found = []
            for t in types:
                while t.get("meta-type") == "array":
                    t = by_name.get(t.get("element-type"), {})
                variants = [by_name.get(v.get("type"), {}) for v in t.get("variants", [])]
                alts = [by_name.get(m.get("type"), {}) for m in t.get("members", [])
                        ] if t.get("meta-type") == "alternate" else []
                for obj in [t, *variants, *alts]:
                    found += [by_name.get(m.get("type"), {}) for m in obj.get("members", [])
                              if m.get("name") == name]
            if not found:
                return False
            types = found
        return True

    def takes_node_bitmaps(self, command: str, member: str) -> bool:
        """Whether ``command``'s list argument ``member`` takes bitmaps as ``{"node",
        "name"}`` objects (an alternate with a ``BlockDirtyBitmap``-like branch), in the
        arguments or in any variant of a union's arguments."""
        by_name = {e.get("name"): e for e in self.schema}
        todo = [by_name.get(by_name.get(command, {}).get("arg-type"), {})]
        while todo:
            t = todo.pop()
            todo += [by_name.get(v.get("type"), {}) for v in t.get("variants", [])]
            for m in t.get("members", []):
                if m.get("name") != member:
                    continue
                elem = by_name.get(by_name.get(m.get("type"), {}).get("element-type"), {})
                if elem.get("meta-type") != "alternate":
                    continue
                for alt in elem.get("members", []):
                    obj = by_name.get(alt.get("type"), {})
                    if {"node", "name"} <= {x.get("name") for x in obj.get("members", [])}:
                        return True
        return False

    def blockdev_drivers(self) -> frozenset[str]:
        """The ``driver`` values ``blockdev-add`` accepts (the ``BlockdevDriver`` enum)."""
        by_name = {e.get("name"): e for e in self.schema}
        args = by_name.get(by_name.get("blockdev-add", {}).get("arg-type"), {})
        for m in args.get("members", []):
            if m.get("name") == "driver":
                enum = by_name.get(m.get("type"), {})
                values = enum.get("values") or [v.get("name") for v in enum.get("members", [])]
                return frozenset(str(v) for v in values)
        return frozenset()

    @staticmethod
    def _member_names(
        entry: dict[str, Any] | None, by_name: dict[Any, dict[str, Any]]
    ) -> frozenset[str]:
        if not entry:
            return frozenset()
        names = {m["name"] for m in entry.get("members", [])}
        for variant in entry.get("variants", []):
            names |= {m["name"] for m in by_name.get(variant.get("type"), {}).get("members", [])}
        return frozenset(names)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.version.split(".") if x.isdigit())

    def to_json(self) -> str:
        data = asdict(self)
        data["commands"] = sorted(self.commands)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Probe:
        d = json.loads(text)
        return cls(
            version=d["version"],
            package=d["package"],
            accelerators=tuple(d["accelerators"]),
            kvm=KvmStatus(**d["kvm"]),
            commands=frozenset(d["commands"]),
            schema=tuple(d["schema"]),
        )


def _probe_run(argv: list[str], what: str) -> processes.Finished:
    """One bounded probe run; a hang or a program that cannot run is one sentence."""
    try:
        res = processes.run(argv, PROBE_TIMEOUT, label=f"probe: {what}",
                            env={**os.environ, "LANG": "C", "LC_ALL": "C"})
    except OSError as e:
        raise ConfigError(f"{argv[0]}: cannot run it ({e.strerror})") from e
    if res.timed_out:
        raise ConfigError(f"{what} did not finish within {PROBE_TIMEOUT:g} s; killed it and "
                          "its process group (is it a working QEMU program?)")
    return res


def list_accelerators(qemu: str) -> tuple[str, ...]:
    """The accelerators compiled into ``qemu`` (``-accel help``)."""
    out = _probe_run([qemu, "-accel", "help"], f"{qemu} -accel help")
    if out.status != 0:
        raise ConfigError(f"{qemu} -accel help failed: {out.stderr.strip() or out.stdout.strip()}")
    lines = [ln.strip() for ln in out.stdout.splitlines()]
    return tuple(ln for ln in lines if ln and not ln.lower().startswith("accelerators"))


def _where(role: Role, prog: Program) -> str:
    """How the user named a program: ``--qemu-img X``, ``QEMU_IMG_PROG=X``, ``X (PATH)``."""
    if prog.source.endswith("option"):
        return f"{role.option} {prog.path}"
    if prog.source.endswith("variable"):
        return f"{role.env}={prog.path}"
    if prog.source.startswith("build dir"):
        return f"{prog.path} (from the build dir)"
    return f"{prog.path} ({prog.source})"


def check_role(role: Role, prog: Program) -> None:
    """Ask the program for ``--version`` and make sure it is the program its role needs.

    QEMU's programs name themselves on the first line: ``qemu-img version 7.2.22``,
    ``qemu-nbd 10.0.2`` (qemu-nbd 10 prints its whole path), ``QEMU emulator version ...``
    for the system emulators (which one is checked with ``query-target`` when probing).
    """
    assert prog.path is not None
    where = _where(role, prog)
    res = _probe_run([prog.path, "--version"], f"{where} --version")
    first = next((ln.strip() for ln in res.stdout.splitlines() if ln.strip()), "")
    if role.key == "system":
        ok = first.startswith("QEMU emulator version")
    else:
        ok = bool(first) and first.split()[0].rsplit("/", 1)[-1] == role.name
    if ok and res.status == 0:
        return
    err = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "")
    if first and res.status == 0:
        said = f"it says {first!r}"
    elif err:
        said = f"'--version' failed ({describe_status(res.status)}): {err}"
    else:
        said = f"'--version' printed nothing ({describe_status(res.status)})"
    raise ConfigError(f"{where} is not {role.name}: {said}")


def probe(binaries: Binaries, workdir: str | None = None) -> Probe:
    """Ask the QEMU under test what it is; raise ConfigError if it cannot even start."""
    from harness.machine import Machine

    qemu = binaries.path("system")
    for role in ROLES:
        if binaries.has(role.key):
            check_role(role, binaries.programs[role.key])
    accels = list_accelerators(qemu)
    with tmpdirs.temporary("probe", workdir) as tmp:
        if not accels:
            raise ConfigError(f"{qemu} lists no accelerators with -accel help; is it QEMU?")
        vm = Machine("probe", qemu, accel="tcg" if "tcg" in accels else accels[0],
                     scratch=Path(tmp), machine_type="none", qmp_timeout=PROBE_TIMEOUT)
        try:
            with vm:
                arch = vm.qmp("query-target").get("arch")
                if arch != "x86_64":
                    where = _where(ROLE_BY_KEY["system"], binaries.programs["system"])
                    raise ConfigError(f"{where} emulates {arch}, not x86_64: the harness "
                                      "needs qemu-system-x86_64")
                ver = vm.qmp("query-version")
                commands = frozenset(c["name"] for c in vm.qmp("query-commands"))
                schema = tuple(vm.qmp("query-qmp-schema")) if "query-qmp-schema" in commands else ()
        except ConfigError:
            raise
        except HarnessError as e:
            raise ConfigError(f"{qemu} does not start a VM: {e}") from e
        kvm = probe_kvm(qemu, accels, Path(tmp))
    q = ver["qemu"]
    return Probe(
        version=f"{q['major']}.{q['minor']}.{q['micro']}",
        package=str(ver.get("package", "")).strip(),
        accelerators=accels,
        kvm=kvm,
        commands=commands,
        schema=schema,
    )


def probe_kvm(qemu: str, accels: tuple[str, ...], tmp: Path) -> KvmStatus:
    """Whether KVM can really run guests here.

    In order: the accelerator exists, ``/dev/kvm`` opens, ``query-kvm`` says enabled, QEMU
    does not warn that the host lacks CPU features the guest CPU model needs (nested
    setups that would crash a real kernel do), and a 512-byte guest prints through the
    debug port no slower than the same guest under TCG.
    """
    if "kvm" not in accels:
        return KvmStatus(False, "this QEMU has no kvm accelerator")
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        return KvmStatus(False, f"/dev/kvm cannot be opened ({e.strerror})")
    kvm_time, problem = _time_boot_sector(qemu, "kvm", tmp)
    if kvm_time is None:
        return KvmStatus(False, problem)
    tcg_time, _ = _time_boot_sector(qemu, "tcg", tmp) if "tcg" in accels else (None, "")
    if tcg_time is not None and kvm_time > max(1.0, 2 * tcg_time):
        return KvmStatus(False, f"a 512-byte test guest took {kvm_time:.1f} s under KVM and "
                         f"{tcg_time:.1f} s under TCG (nested virtualisation?)")
    return KvmStatus(True, f"a test guest ran under KVM in {kvm_time:.2f} s")


def _time_boot_sector(qemu: str, accel: str, tmp: Path) -> tuple[float | None, str]:
    """Seconds until the boot sector printed under ``accel``, or None and why not."""
    from harness.machine import Machine

    disk = tmp / "boot.img"
    disk.write_bytes(_boot_sector())
    out = tmp / f"debugcon-{accel}.out"
    vm = Machine(
        f"{accel}-probe", qemu, accel=accel, scratch=tmp, qmp_timeout=PROBE_TIMEOUT,
        args=["-drive", f"file={disk},format=raw,if=ide", "-debugcon", f"file:{out}"],
    )
    start = time.monotonic()
    try:
        with vm:
            if accel == "kvm":
                info = vm.qmp("query-kvm")
                if not (info.get("enabled") and info.get("present")):
                    return None, f"query-kvm says {info}"
                missing = [ln for ln in vm.log_path.read_text(errors="replace").splitlines()
                           if "support requested feature" in ln]
                if missing:
                    return None, ("the host CPU lacks features of the guest CPU model under "
                                  f"KVM ({missing[0].split('warning: ', 1)[-1]})")
            while time.monotonic() - start < KVM_GUEST_DEADLINE:
                if out.exists() and b"QIO-OK" in out.read_bytes():
                    return time.monotonic() - start, ""
                time.sleep(0.02)
            status = vm.qmp("query-status").get("status")
    except HarnessError as e:
        said = getattr(e, "log_tail", "").strip().splitlines()
        why = f": {said[-1].split(': ', 1)[-1]}" if said else ""
        return None, f"QEMU with -accel {accel} failed ({getattr(e, 'reason', e)}){why}"
    return None, (f"a 512-byte test guest did not run under {accel} within "
                  f"{KVM_GUEST_DEADLINE:g} s (VM status {status!r})")


def resolve_accel(requested: str, probe_: Probe) -> tuple[str, str]:
    """Map ``--accel`` to the accelerator to use, with a sentence for the report header."""
    if requested == "auto":
        if probe_.kvm.usable:
            return "kvm", "kvm (auto: KVM is usable)"
        if "tcg" not in probe_.accelerators:
            raise ConfigError("--accel auto: KVM is not usable and this QEMU has no TCG")
        return "tcg", f"tcg (auto: KVM not usable: {probe_.kvm.reason})"
    if requested == "kvm" and not probe_.kvm.usable:
        raise ConfigError(f"--accel kvm: KVM is not usable on this machine: {probe_.kvm.reason}")
    if requested not in probe_.accelerators:
        have = ", ".join(probe_.accelerators)
        raise ConfigError(f"--accel {requested}: this QEMU has no {requested} accelerator "
                          f"(it has: {have})")
    return requested, requested
