"""Configure and build, from a QEMU source tree, only the programs the harness runs.

The tree may be an upstream git checkout or a Debian source package (`apt-get source
qemu`), whose ``+dfsg``/``+ds`` repacks lack what upstream ships prebuilt: the x86 option
ROMs, the firmware blobs and (QEMU >= 10) the bundled meson wheel. Each gap is filled here,
from what the tree itself says it needs, never from its version number:

- meson: ``pythondeps.toml`` names the accepted and the pinned meson; when neither the
  tree's ``python/wheels`` nor the system's meson can serve, the pinned one is installed
  from PyPI into a cached venv and handed to configure with ``--python``;
- firmware blobs: ``--disable-install-blobs`` when the tree has none, since meson checks
  at configure time that the files it would install exist;
- edk2 blobs: ``pc-bios/meson.build`` lists ``*.fd.bz2`` inputs that meson checks at
  configure time when bzip2 is installed, though no target here uses them; only when
  configure fails on one do the missing ones get empty placeholders (then it is retried);
- ccache: ``--cc``/``--cxx`` name links to it (:func:`ccache_compilers`);
- option ROMs: built with the build tree's ``pc-bios/optionrom`` makefile, or with Debian's
  ``debian/optionrom.mak`` on trees whose configure does not set it up;
- firmware: a build tree looks for BIOS and ROMs where ``qemu-system-x86_64 -L help`` says;
  the system's seabios and ipxe-qemu files and the ROMs built above are linked there.

The build dir is reused: a stamp (``.qiotests-build``) names the source tree (path, inode
and birth time, so a re-created tree is never mistaken for the old one) and the configure
flags. A matching stamp skips configure and ninja rebuilds only what changed; another tree
or other flags wipe the dir; a non-empty dir without a stamp is refused, never touched.
The stamp's text is the one the former ``scripts/build-qemu.sh`` wrote: its dirs stay valid.

Only the CLI prints: this module returns a :class:`BuildResult` or raises
:class:`BuildError`, whose ``first_error`` is the first compiler (or meson) error of the
failing step, as one block.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import processes
from harness.errors import ConfigError, HarnessError, format_argv

PROGRAMS = ("qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")
NINJA_TARGETS = ("qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd",
                 "storage-daemon/qemu-storage-daemon")
BASE_FLAGS = (
    "--target-list=x86_64-softmmu", "--disable-docs", "--disable-werror", "--enable-kvm",
    "--enable-tcg", "--disable-gtk", "--disable-sdl", "--disable-vnc", "--disable-spice",
    "--disable-opengl", "--disable-xen", "--enable-tools", "--disable-guest-agent",
    "--disable-user", "--enable-slirp", "--disable-capstone",
    "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu",
)
# the x86 option ROMs that Debian's repacks strip from pc-bios/
OPTION_ROMS = ("kvmvapic.bin", "linuxboot.bin", "linuxboot_dma.bin", "multiboot.bin",
               "multiboot_dma.bin", "pvh.bin")
# where Debian's seabios and ipxe-qemu packages put the BIOS, VGA BIOS and NIC ROMs
SYSTEM_FIRMWARE_DIRS = (Path("/usr/share/seabios"), Path("/usr/lib/ipxe/qemu"))
# what configure, ninja and the ROM build need (Debian package names)
# (gcc-multilib: configure builds the 16/32-bit option ROMs only when ``cc -m32`` links)
DEB_DEPS = ("gcc", "g++", "gcc-multilib", "make", "binutils", "pkg-config", "meson",
            "ninja-build", "flex", "bison", "python3", "python3-venv", "libglib2.0-dev",
            "libpixman-1-dev", "zlib1g-dev", "libslirp-dev", "libfdt-dev", "libzstd-dev",
            "libaio-dev", "seabios", "ipxe-qemu")
#: Bounds for the programs the build asks things (git describe, --version, dpkg-query)
#: and for package installs (apt-get, pip); a build step itself has none.
QUERY_TIMEOUT = 60.0
INSTALL_TIMEOUT = 1800.0
STAMP = ".qiotests-build"
CONFIGURE_LOG = "qiotests-configure.log"
NINJA_LOG = "qiotests-ninja.log"

Progress = Callable[[str], None]


class BuildError(HarnessError):
    """configure, ninja or a firmware step failed; keeps the log and its first error."""

    def __init__(self, step: str, log: Path, status: int | None, first_error: str) -> None:
        self.step = step
        self.log = log
        self.status = status
        self.first_error = first_error
        super().__init__(f"{step} failed (exit status {status}); full log: {log}")


# ---------------------------------------------------------------------------------------
# pure parts: error extraction, versions, stamps

# gcc/clang: "path:line[:col]: [fatal ]error: ..."; meson: "path:line:col: ERROR: ..."
_COMPILER_ERROR = re.compile(r"^(?P<loc>[^\s:][^:\n]*:\d+(?::\d+)?): (?:fatal )?error: ")
_MESON_ERROR = re.compile(r"^(?:[^\s:][^:\n]*:\d+:\d+: )?ERROR: ")
_LINK_ERROR = re.compile(r"undefined reference to|multiple definition of|^collect2: error:"
                         r"|^/usr/bin/ld: .*(?:cannot find|error)")
# what ends a compiler diagnostic's context: ninja's next step, its verdict, make's
_NEXT_STEP = re.compile(r"^(?:\[\d+/\d+\] |FAILED: |ninja: |make(?:\[\d+\])?: |\S+:\d+(?::\d+)?: "
                        r"(?:fatal )?(?:error|warning): )")
_MAX_BLOCK = 20


def first_error(log: str) -> str:
    """The first error of a configure or build log, with its context, as one block.

    In order of preference: a compiler error (``file:line[:col]: error: ...``) with the
    ``In function`` line before it and the source excerpt and notes after it; a meson
    ``ERROR:`` line; a linker error; the last lines of the log.
    """
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if _COMPILER_ERROR.match(line):
            start = i - 1 if i > 0 and re.search(r": (In |At )", lines[i - 1]) else i
            block = lines[start:i + 1]
            for nxt in lines[i + 1:]:
                if _NEXT_STEP.match(nxt) or not nxt.strip() or len(block) >= _MAX_BLOCK:
                    break
                block.append(nxt)
            return "\n".join(block)
    for i, line in enumerate(lines):
        if _MESON_ERROR.match(line):
            return "\n".join(ln for ln in lines[i:i + 3] if ln.strip()
                             and not ln.startswith("A full log"))
    for i, line in enumerate(lines):
        if _LINK_ERROR.search(line):
            start = i - 1 if i > 0 and ": in function" in lines[i - 1] else i
            return "\n".join(lines[start:i + 1])
    tail = [ln for ln in lines if ln.strip()][-_MAX_BLOCK:]
    return "\n".join(tail) if tail else "(the log is empty)"


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.5.0"`` -> ``(1, 5, 0)``; stops at the first part that is not a number."""
    parts: list[int] = []
    for p in text.strip().split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


@dataclass(frozen=True)
class MesonNeed:
    """What a tree's ``pythondeps.toml`` says about meson: the lowest accepted, the pinned."""

    accepted: str
    installed: str


def meson_need(pythondeps: str) -> MesonNeed | None:
    """The ``[meson]`` group's meson entry of a ``pythondeps.toml`` (QEMU >= 8.2), or None."""
    import tomllib

    try:
        data = tomllib.loads(pythondeps)
    except tomllib.TOMLDecodeError:
        return None
    entry = data.get("meson", {}).get("meson")
    if not isinstance(entry, dict):
        return None
    accepted = str(entry.get("accepted", "")).lstrip(">=").strip()
    installed = str(entry.get("installed", accepted)).strip()
    if not accepted:
        return None
    return MesonNeed(accepted=accepted, installed=installed or accepted)


def stamp_text(src: Path, src_id: str, version: str, flags: Sequence[str]) -> str:
    """The stamp a build dir keeps: which tree and which flags configured it."""
    return f"src={src}\nsrc_id={src_id}\nversion={version}\nconfigure={' '.join(flags)}\n"


class Reuse(enum.Enum):
    """What to do with a build dir before configuring."""

    REUSE = "reuse"        # configured by us for this tree with these flags
    FRESH = "fresh"        # missing or empty
    WIPE = "wipe"          # ours, but for another tree, other flags, or half-configured
    REFUSE = "refuse"      # not empty and not ours: never touched


# Flags that change neither what is compiled nor how it runs: the ccache wrapper, and not
# installing blobs the tree does not have. A dir configured without them (by the former
# scripts/build-qemu.sh, say) is reused rather than rebuilt from scratch.
_NEUTRAL_FLAG = re.compile(r"^--(?:(?:cc|cxx)=\S*/ccache-bin/(?:cc|c\+\+)|disable-install-blobs)$")


def _essential(stamp: str) -> str:
    """The stamp with the neutral flags left out of its ``configure=`` line."""
    out = []
    for line in stamp.splitlines():
        if line.startswith("configure="):
            flags = re.split(r" (?=--)", line.removeprefix("configure="))
            line = "configure=" + " ".join(f for f in flags if not _NEUTRAL_FLAG.match(f))
        out.append(line)
    return "\n".join(out)


def reuse_decision(build: Path, wanted: str) -> Reuse:
    """Decide from the build dir's contents and stamp whether it can be reused."""
    if not build.exists() or not any(build.iterdir()):
        return Reuse.FRESH
    stamp = build / STAMP
    if not stamp.is_file():
        return Reuse.REFUSE
    if (build / "build.ninja").is_file() \
            and _essential(stamp.read_text(errors="replace")) == _essential(wanted):
        return Reuse.REUSE
    return Reuse.WIPE


def ccache_hits(before: Mapping[str, int], after: Mapping[str, int]) -> tuple[int, int]:
    """(hits, misses) between two ``ccache --print-stats`` snapshots."""
    def delta(*keys: str) -> int:
        return sum(after.get(k, 0) - before.get(k, 0) for k in keys)
    return (delta("direct_cache_hit", "preprocessed_cache_hit"), delta("cache_miss"))


def parse_ccache_stats(text: str) -> dict[str, int]:
    """``ccache --print-stats`` (tab-separated ``key value`` lines) as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition("\t")
        if value.strip().lstrip("-").isdigit():
            out[key.strip()] = int(value)
    return out


# ---------------------------------------------------------------------------------------
# the source tree


@dataclass(frozen=True)
class SourceTree:
    """A QEMU source tree as configure will see it."""

    path: Path
    version: str
    git_describe: str | None
    meson: MesonNeed | None
    has_meson_wheel: bool
    has_blobs: bool           # the prebuilt firmware upstream ships (Debian's repacks drop it)

    @classmethod
    def inspect(cls, path: Path) -> SourceTree:
        if not path.is_dir():
            raise ConfigError(f"build-qemu: no source tree at {path}")
        path = path.resolve()
        if not (path / "configure").is_file() or not (path / "meson.build").is_file():
            raise ConfigError(f"build-qemu: {path} is not a QEMU source tree "
                              "(no configure and meson.build)")
        version_file = path / "VERSION"
        version = version_file.read_text().strip() if version_file.is_file() else "?"
        deps = path / "pythondeps.toml"
        wheels = path / "python" / "wheels"
        return cls(
            path=path, version=version, git_describe=git_describe(path),
            meson=meson_need(deps.read_text()) if deps.is_file() else None,
            has_meson_wheel=wheels.is_dir() and any(wheels.glob("meson-*.whl")),
            has_blobs=(path / "pc-bios" / "bios-256k.bin").is_file(),
        )

    def tree_id(self) -> str:
        """Inode and birth time (ctime where the file system has none) of the root dir."""
        cp = _query(["stat", "-c", "%i %.9W", str(self.path)])
        out = cp.stdout.strip()
        birth = out.split(" ", 1)[1] if " " in out else "-"
        if cp.status != 0 or birth.startswith(("0", "-")):
            st = self.path.stat()
            return f"{st.st_ino} {st.st_ctime_ns // 10**9}.{st.st_ctime_ns % 10**9:09d}"
        return out


def git_describe(path: Path) -> str | None:
    """``git describe --tags --always --dirty`` of a git tree, None for other trees."""
    if not (path / ".git").exists() or shutil.which("git") is None:
        return None
    cp = _query(["git", "-C", str(path), "describe", "--tags", "--always", "--dirty"])
    return cp.stdout.strip() or None if cp.status == 0 else None


def _query(argv: Sequence[str]) -> processes.Finished:
    """A short program the build asks something, bounded (own group, file-size limit)."""
    return processes.run(argv, QUERY_TIMEOUT, label=Path(argv[0]).name)


def _last_words(cp: processes.Finished, timeout: float) -> str:
    """The last line a failed program wrote to stderr, or that it hung."""
    if cp.timed_out:
        return f"did not finish within {timeout:g} s; killed it"
    return (cp.stderr.strip().splitlines() or ["?"])[-1]


# ---------------------------------------------------------------------------------------
# what the build needs from the machine


def missing_deb_packages(packages: Sequence[str] = DEB_DEPS) -> list[str]:
    """The Debian packages of `packages` not installed (empty off Debian/Ubuntu)."""
    if shutil.which("dpkg-query") is None:
        return []
    cp = _query(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *packages])
    ok = {ln.split()[0] for ln in cp.stdout.splitlines() if ln.endswith("install ok installed")}
    return [p for p in packages if p not in ok]


def install_deb_packages(missing: Sequence[str]) -> None:
    """apt-get install `missing` as root, or stop with the command to run."""
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise ConfigError("build-qemu: missing build dependencies; as root run: "
                          f"apt-get update && {format_argv(cmd)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if processes.run(cmd, INSTALL_TIMEOUT, label="apt-get", env=env).status != 0:
        processes.run(["apt-get", "update", "-q"], INSTALL_TIMEOUT, label="apt-get", env=env)
        cp = processes.run(cmd, INSTALL_TIMEOUT, label="apt-get", env=env)
        if cp.status != 0:
            raise ConfigError(f"build-qemu: {format_argv(cmd)} failed: "
                              + _last_words(cp, INSTALL_TIMEOUT))


def system_meson_version() -> tuple[int, ...]:
    exe = shutil.which("meson")
    if exe is None:
        return ()
    cp = _query([exe, "--version"])
    return parse_version(cp.stdout) if cp.status == 0 else ()


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where build-qemu keeps what outlives a build dir (the meson venvs)."""
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qiotests"


def meson_python(need: MesonNeed, cache: Path) -> Path:
    """A Python whose site has meson ``need.installed`` (a venv made once from PyPI)."""
    venv = cache / f"meson-{need.installed}"
    python = venv / "bin" / "python3"
    probe = [str(python), "-c", "import mesonbuild.coredata as c; print(c.version)"]
    if python.exists():
        cp = _query(probe)
        if cp.status == 0 and cp.stdout.strip() == need.installed:
            return python
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable if sys.prefix == sys.base_prefix else "python3", "-m", "venv",
              str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", f"meson=={need.installed}"]]
    for argv in steps:
        cp = processes.run(argv, INSTALL_TIMEOUT, label="meson venv")
        if cp.status != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise ConfigError(f"build-qemu: the tree needs meson >= {need.accepted} and "
                              f"{format_argv(argv)} failed: " + _last_words(cp, INSTALL_TIMEOUT))
    return python


_EDK2_MISSING = re.compile(r"ERROR: File edk2-[\w.-]+\.fd\.bz2 does not exist")


def edk2_placeholders(src: Path) -> list[Path]:
    """The ``*.fd.bz2`` inputs ``pc-bios/meson.build`` names that the tree lacks.

    Meson checks ``files()`` inputs at configure time, so a repack without the edk2 blobs
    fails to configure x86_64-softmmu when bzip2 is installed, although nothing this build
    asks ninja for uses them. (Debian's own patch disables the block with ``and false``.)
    """
    mb = src / "pc-bios" / "meson.build"
    if not mb.is_file():
        return []
    text = mb.read_text(errors="replace")
    block = re.search(r"^if unpack_edk2_blobs(?P<cond>[^\n]*)\n(?P<body>.*?)^endif", text,
                      re.M | re.S)
    if block is None or "false" in block.group("cond"):
        return []
    names = re.findall(r"'(edk2-[\w.-]+\.fd)'", block.group("body"))
    return [src / "pc-bios" / f"{n}.bz2" for n in names
            if not (src / "pc-bios" / f"{n}.bz2").exists()]


def ccache_stats() -> dict[str, int]:
    exe = shutil.which("ccache")
    if exe is None:
        return {}
    cp = _query([exe, "--print-stats"])
    return parse_ccache_stats(cp.stdout) if cp.status == 0 else {}


# ---------------------------------------------------------------------------------------
# the build


@dataclass
class BuildResult:
    """What a build did, for the CLI to show and for callers (bisect, matrix) to use."""

    src: SourceTree
    build: Path
    decision: Reuse
    flags: list[str]
    ccache: str                       # "used (ccache)" or why not
    ccache_hits: tuple[int, int] | None
    configure_seconds: float
    ninja_seconds: float
    ninja_steps: int
    version_line: str
    notes: list[str] = field(default_factory=list)


def ccache_compilers(cache: Path) -> tuple[Path, Path] | None:
    """``cc`` and ``c++`` links to ccache in a dir of our own (ccache's masquerade mode).

    QEMU's configure writes the compiler into meson's cross file, so meson never adds
    ccache itself; and ``--cc='ccache cc'`` breaks configure's probe for a compiler for the
    x86 option ROMs (it runs ``"$target_cc"`` quoted, one word). A link named ``cc`` is one
    word, and ccache called through it runs the next ``cc`` on PATH.
    """
    exe = shutil.which("ccache")
    if exe is None:
        return None
    d = cache / "ccache-bin"
    d.mkdir(parents=True, exist_ok=True)
    links = (d / "cc", d / "c++")
    for link in links:
        if not link.is_symlink() or os.readlink(link) != exe:
            link.unlink(missing_ok=True)
            link.symlink_to(exe)
    return links


def configure_flags(src: SourceTree, python: Path | None,
                    ccache: tuple[Path, Path] | None, gcov: bool = False) -> list[str]:
    """The configure command line for `src` (pure but for the paths it is given).

    `gcov` adds ``--enable-gcov`` (meson's ``b_coverage``): the programs then write
    ``.gcda`` counters into the build dir when they exit, for ``make coverage``.
    """
    flags = list(BASE_FLAGS)
    if gcov:
        flags.append("--enable-gcov")
    if not src.has_blobs:
        # a repack: meson would check at configure time that the blobs it installs exist
        flags.append("--disable-install-blobs")
    if ccache:
        flags += [f"--cc={ccache[0]}", f"--cxx={ccache[1]}"]
    if python is not None:
        flags.append(f"--python={python}")
    return flags


def _run_logged(argv: Sequence[str], cwd: Path, log: Path, progress: Progress | None,
                step: str) -> None:
    """Run `argv` with its output in `log` (each line also to `progress`); raise on failure."""
    with log.open("wb") as f:
        f.write(f"$ {format_argv(argv)}\n".encode())
        status = processes.run_logged(argv, f, label=step, cwd=cwd,
                                      env={**os.environ, "LANG": "C", "LC_ALL": "C"},
                                      on_line=progress)
    if status != 0:
        raise BuildError(step, log, status, first_error(log.read_text(errors="replace")))


def build_qemu(src_path: Path, build: Path, jobs: int | None = None,
               progress: Progress | None = None, install_deps: bool = True,
               gcov: bool = False) -> BuildResult:
    """Configure (when needed) and build the harness's programs from `src_path` in `build`.

    `gcov`: an instrumented build (``--enable-gcov``); its flags are in the stamp, so a
    dir built without it is wiped and configured afresh, never mixed.
    """
    src = SourceTree.inspect(src_path)
    build = build.resolve()
    if build == src.path or src.path in build.parents:
        raise ConfigError(f"build-qemu: the build dir {build} must be outside the source tree")
    if install_deps:
        missing = missing_deb_packages()
        if missing:
            install_deb_packages(missing)
    notes: list[str] = []
    python = None
    if src.meson is not None and not src.has_meson_wheel \
            and system_meson_version() < parse_version(src.meson.accepted):
        python = meson_python(src.meson, cache_dir())
        notes.append(f"meson {src.meson.installed} from PyPI (the tree wants >= "
                     f"{src.meson.accepted}): {python}")
    ccache = ccache_compilers(cache_dir())
    flags = configure_flags(src, python, ccache, gcov)
    wanted = stamp_text(src.path, src.tree_id(), src.version, flags)

    decision = reuse_decision(build, wanted)
    if decision is Reuse.REFUSE:
        raise ConfigError(f"build-qemu: {build} is not empty and was not made by build-qemu; "
                          "give a new or empty dir")
    t0 = time.monotonic()
    if decision is not Reuse.REUSE:
        if decision is Reuse.WIPE:
            shutil.rmtree(build)
        build.mkdir(parents=True, exist_ok=True)
        # a stamp that matches nothing while configure runs: an interrupted one is redone
        (build / STAMP).write_text("configuring\n")
        configure = [str(src.path / "configure"), *flags]
        try:
            _run_logged(configure, build, build / CONFIGURE_LOG, progress, "configure")
        except BuildError as e:
            placeholders = edk2_placeholders(src.path) if _EDK2_MISSING.search(
                e.first_error) else []
            if not placeholders:
                raise
            for p in placeholders:
                p.touch()
            notes.append(f"{len(placeholders)} empty edk2 placeholders in {p.parent} "
                         "(pc-bios/meson.build checks them at configure time; unused here)")
            _run_logged(configure, build, build / CONFIGURE_LOG, progress, "configure")
        (build / STAMP).write_text(wanted)
    t1 = time.monotonic()

    before = ccache_stats()
    steps = [0]

    def count(line: str) -> None:
        m = re.match(r"\[(\d+)/(\d+)\]", line)
        if m:
            steps[0] = int(m.group(1))
        if progress is not None:
            progress(line)

    ninja = shutil.which("ninja") or "ninja"
    argv = [ninja, "-C", str(build), *([f"-j{jobs}"] if jobs else []), *NINJA_TARGETS]
    _run_logged(argv, build, build / NINJA_LOG, count, "build")
    t2 = time.monotonic()
    after = ccache_stats()

    notes += build_option_roms(src.path, build)
    link_firmware(build)
    for prog in PROGRAMS:
        if not os.access(build / prog, os.X_OK):
            raise ConfigError(f"build-qemu: {build / prog} is missing after the build")
    version_line = _query([str(build / "qemu-img"), "--version"]).stdout.partition("\n")[0]
    return BuildResult(
        src=src, build=build, decision=decision, flags=flags,
        ccache=compiler_wrapper(build), ccache_hits=ccache_hits(before, after) if ccache else None,
        configure_seconds=t1 - t0, ninja_seconds=t2 - t1, ninja_steps=steps[0],
        version_line=version_line, notes=notes,
    )


def compiler_wrapper(build: Path) -> str:
    """Whether the configured C compiler runs through ccache, from meson's own record."""
    intro = build / "meson-info" / "intro-compilers.json"
    exelist: list[str] = []
    if intro.is_file():
        data = json.loads(intro.read_text())
        exelist = list(data.get("host", {}).get("c", {}).get("exelist", []))
    if not exelist:  # older meson: the compile rule in build.ninja
        text = (build / "build.ninja").read_text(errors="replace")
        m = re.search(r"^rule c_COMPILER\n command = (\S+)", text, re.M)
        exelist = [m.group(1)] if m else []
    exe = shutil.which(exelist[0]) if exelist else None
    if exe and Path(exe).resolve().name == "ccache":
        return "used"
    return "not used" + ("" if shutil.which("ccache") else " (ccache is not installed)")


def build_option_roms(src: Path, build: Path) -> list[str]:
    """Build the x86 option ROMs a repack lacks; say how, or nothing when none are missing."""
    if all((src / "pc-bios" / r).is_file() for r in OPTION_ROMS):
        return []
    debian_mak = src / "debian" / "optionrom.mak"
    tree_rom_dir = build / "pc-bios" / "optionrom"
    if (tree_rom_dir / "config.mak").is_file():
        argv, out = ["make", "-s", "-C", str(tree_rom_dir)], tree_rom_dir
    elif debian_mak.is_file():
        out = build / "optionrom"
        out.mkdir(exist_ok=True)
        argv = ["make", "-s", "-f", str(debian_mak), "-C", str(out), f"SRC_PATH={src}", "all"]
    else:
        return ["no option ROMs: the tree has none and configure found no compiler for them "
                "(cc -m32 must link: gcc-multilib; then remove the build dir); -kernel boots "
                "will fail"]
    log = build / "qiotests-optionrom.log"
    with log.open("wb") as f:
        status = processes.run_logged(argv, f, label="option ROM build",
                                      env={**os.environ, "LANG": "C"})
    if status != 0:
        raise BuildError("option ROM build", log, status, first_error(log.read_text()))
    return [f"option ROMs built in {out}"]


def firmware_search_dirs(build: Path) -> list[Path]:
    """The dirs ``qemu-system-x86_64 -L help`` lists that lie inside the build tree."""
    cp = _query([str(build / "qemu-system-x86_64"), "-L", "help"])
    dirs = []
    for line in cp.stdout.splitlines():
        p = Path(line.strip())
        if p.is_absolute() and (p == build or build in p.parents):
            dirs.append(p)
    return dirs


def link_firmware(build: Path) -> None:
    """Make the BIOS and ROMs findable by QEMU run from `build`.

    Into every dir ``-L help`` names inside the build tree go symlinks to the system's
    seabios and ipxe-qemu files and the option ROMs built here, for names that dir lacks
    (a blob the tree installed itself is kept). configure regenerates ``qemu-bundle``, so
    this runs after every build.
    """
    files: dict[str, Path] = {}
    roms = [build / "pc-bios" / "optionrom", build / "optionrom"]
    for d in [*roms, *SYSTEM_FIRMWARE_DIRS]:
        if d.is_dir():
            for f in sorted(d.iterdir()):
                if f.suffix in (".bin", ".rom") and f.is_file():
                    files.setdefault(f.name, f)
    for d in firmware_search_dirs(build):
        if d.is_symlink():
            continue  # a link to a system dir (made by the former script): never write there
        d.mkdir(parents=True, exist_ok=True)
        for name, target in files.items():
            link = d / name
            if link.is_symlink() and not link.exists():
                link.unlink()  # a dangling link to a blob the repack dropped
            if not link.exists():
                link.symlink_to(target)
    # the harness also looks for the storage daemon at the top of the build dir
    top = build / "qemu-storage-daemon"
    if not top.exists():
        top.unlink(missing_ok=True)
        top.symlink_to("storage-daemon/qemu-storage-daemon")
