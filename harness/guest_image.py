"""A tiny Linux guest made from distro packages: a kernel and a busybox initramfs.

Nothing is installed: ``apt-get download`` fetches a kernel package and ``busybox-static``
into a work dir, ``dpkg-deb -x`` unpacks them, and an initramfs (gzip'd cpio, newc format,
written here: no ``cpio`` program needed) gets busybox, a small ``/init`` and the kernel
modules the guest needs for a virtio-blk disk, with their dependencies. Which modules the
kernel has built in is read from its ``modules.builtin``; the dependencies of the others
from each module's own ``.modinfo`` section (the package ships no ``modules.dep``: depmod
writes it at install time).

Which kernel package: the first that apt offers of :data:`KERNEL_PACKAGES`, small
virtual-machine flavours first (Debian's ``cloud`` kernel, Ubuntu's ``kvm`` and
``virtual``), then the generic ones. A metapackage is followed to the real kernel package
through its ``Depends``; Ubuntu's kernel package names a ``linux-modules-*`` package, which
is fetched too.

The result is cached outside the repository, in ``~/.cache/qiotests/guest/<key>/``
(``$XDG_CACHE_HOME`` is honoured), keyed by the package versions and by what goes into the
initramfs, so a new kernel in the archive or a change of ``/init`` makes a new guest and
nothing stale is ever booted. Two processes that need it at once (xdist workers) build it
once: the second waits on a lock file and then finds it.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import tmpdirs
from harness.errors import ConfigError

#: kernel packages, best first; the first one apt has a candidate for is used
KERNEL_PACKAGES = ("linux-image-cloud-amd64", "linux-image-kvm", "linux-image-virtual",
                   "linux-image-amd64", "linux-image-generic")
BUSYBOX_PACKAGE = "busybox-static"
#: what the guest needs from the kernel: a virtio PCI transport and the block driver
WANTED_MODULES = ("virtio_pci", "virtio_blk")
#: printed by /init when the guest is ready for commands
READY_MARKER = "QIO-GUEST-READY"
#: seconds each apt/dpkg step may take
STEP_TIMEOUT = 600.0

INIT = f"""#!/bin/sh
# qiotests guest: mount the basics, load the virtio modules (each probes its devices
# before insmod returns), then a shell on the serial console. Every line of this file
# is in the cache key.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "qio-init: insmod $m failed"; done
stty -echo -onlcr 2>/dev/null
export PS1='' PATH=/bin
echo {READY_MARKER}
exec sh
"""


@dataclass(frozen=True)
class GuestFiles:
    """A bootable guest: the kernel and the initramfs, and where they came from."""

    kernel: Path
    initrd: Path
    origin: str  # "linux-image-6.1.0-57-cloud-amd64 6.1.192-3, busybox-static 1:1.35.0-4"

    def to_json(self) -> dict[str, str]:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "origin": self.origin}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> GuestFiles:
        return cls(Path(d["kernel"]), Path(d["initrd"]), d["origin"])


class GuestBuildError(ConfigError):
    """The guest could not be built; the message is one sentence naming the step."""


Say = Callable[[str], None]


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qiotests" / "guest"


# -- apt --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    name: str
    version: str
    depends: tuple[str, ...]


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                             timeout=STEP_TIMEOUT, env={**os.environ, "LANG": "C",
                                                        "LC_ALL": "C"})
    except FileNotFoundError as e:
        raise GuestBuildError(f"building the guest needs {argv[0]} (Debian or Ubuntu's "
                              f"apt and dpkg), which is not installed: {what}") from e
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError(f"{what} did not finish within {STEP_TIMEOUT:g} s") from e
    if res.returncode != 0:
        err = [ln for ln in (res.stderr or res.stdout).splitlines()
               if ln.strip() and not ln.startswith("W: ")]
        raise GuestBuildError(f"{what} failed: {err[-1] if err else f'status {res.returncode}'}")
    return res.stdout


def apt_show(names: Sequence[str]) -> dict[str, Package]:
    """apt's candidate of each package in ``names`` that apt knows (one ``apt-cache``
    run: loading apt's cache is what takes the time)."""
    try:
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", *names],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "LANG": "C", "LC_ALL": "C"}).stdout
    except FileNotFoundError as e:
        raise GuestBuildError("building the guest needs apt-cache (Debian or Ubuntu), "
                              "which is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError("apt-cache show did not finish within 120 s") from e
    found: dict[str, Package] = {}
    for stanza in out.split("\n\n"):
        pkg = parse_apt_show(stanza)
        if pkg is not None and pkg.name not in found:
            found[pkg.name] = pkg
    return found


def parse_apt_show(text: str) -> Package | None:
    """The first stanza of ``apt-cache show``: name, version, the first alternative of
    each ``Depends`` entry."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if "Package" not in fields or "Version" not in fields:
        return None
    deps = tuple(d.split("|")[0].split("(")[0].strip().split(":")[0]
                 for d in fields.get("Depends", "").split(",") if d.strip())
    return Package(fields["Package"], fields["Version"], deps)


_REAL_KERNEL = re.compile(r"^linux-image-(unsigned-)?\d")
_MODULES = re.compile(r"^linux-modules-\d")
Show = Callable[[Sequence[str]], dict[str, Package]]


def choose_packages(show: Show = apt_show) -> list[Package]:
    """The packages to fetch: the real ``linux-image-<version>-<flavour>`` package (a
    metapackage followed through its Depends), on Ubuntu the ``linux-modules-*`` package
    it depends on, and busybox-static."""
    first = show([*KERNEL_PACKAGES, BUSYBOX_PACKAGE])
    busybox = first.get(BUSYBOX_PACKAGE)
    if busybox is None:
        raise GuestBuildError(f"apt offers no {BUSYBOX_PACKAGE} package (has 'apt-get "
                              "update' been run as root?)")
    for name in KERNEL_PACKAGES:
        pkg = first.get(name)
        for _ in range(3):  # metapackage -> real package (Ubuntu may have two levels)
            if pkg is None or _REAL_KERNEL.match(pkg.name):
                break
            real = next((d for d in pkg.depends if d.startswith("linux-image-")), None)
            pkg = show([real]).get(real) if real else None
        if pkg is None or not _REAL_KERNEL.match(pkg.name):
            continue
        wanted = [d for d in pkg.depends if _MODULES.match(d)]
        mods = show(wanted) if wanted else {}
        return [pkg, *(mods[m] for m in wanted if m in mods), busybox]
    raise GuestBuildError(
        "apt offers none of the kernel packages " + ", ".join(KERNEL_PACKAGES)
        + " (has 'apt-get update' been run as root?); or give your own guest with "
        "--guest-kernel and --guest-initrd")


# -- the initramfs ----------------------------------------------------------------------

class Cpio:
    """An archive in the ``newc`` format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        head = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        self.ino += 1
        self.buf.write(head.encode() + encoded)
        self.buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)
        self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        return self.buf.getvalue()


def modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError("a kernel module is not a 64-bit ELF file")
    endian = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(endian + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from(endian + "IIQQQQ", data,
                                                          shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            out: dict[str, str] = {}
            for item in data[off:off + size].split(b"\0"):
                k, sep, v = item.decode(errors="replace").partition("=")
                if sep and k not in out:
                    out[k] = v
            return out
    return {}


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed on the host (the guest's busybox insmod takes
    plain ELF)."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise GuestBuildError("the kernel's modules are zstd-compressed and no zstd "
                                  "program is installed (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return raw


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The modules to load, in load order (dependencies first), as (name, ELF bytes);
    the ones the kernel has built in are left out."""
    builtin = set()
    listing = moddir / "modules.builtin"
    if listing.exists():
        builtin = {_module_name(Path(ln.strip())) for ln in listing.read_text().splitlines()
                   if ln.strip()}
    files = {_module_name(p): p for p in moddir.rglob("*.ko*") if ".ko" in p.name}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name not in files:
            raise GuestBuildError(f"the kernel has no module {name} and does not build it "
                                  f"in (needed for {' <- '.join(chain) or name})")
        seen.add(name)
        data = _read_module(files[name])
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(dep.replace("-", "_"), (*chain, name))
        order.append((name, data))

    for w in wanted:
        visit(w, ())
    return order


def initramfs(busybox: Path, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The gzip'd cpio: busybox, /init, the modules and their load order."""
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "modules"):
        c.directory(d)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", INIT.encode(), 0o755)
    c.file("modules.order", "".join(f"{n}\n" for n, _ in modules).encode())
    for name, data in modules:
        c.file(f"modules/{name}.ko", data)
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


# -- building and the cache ---------------------------------------------------------------

def _key(packages: Sequence[Package]) -> str:
    h = hashlib.sha256()
    for p in packages:
        h.update(f"{p.name}={p.version}\n".encode())
    h.update(INIT.encode())
    h.update(",".join(WANTED_MODULES).encode())
    kernel = re.sub(r"[^A-Za-z0-9.+-]", "_", packages[0].name.removeprefix("linux-image-"))
    return f"{kernel}-{h.hexdigest()[:12]}"


def ensure(say: Say, root: Path | None = None, shared: Path | None = None) -> GuestFiles:
    """The guest for the packages apt offers now: from the cache, or built (with progress
    through ``say``) and cached. Raises GuestBuildError with one sentence.

    Asking apt takes seconds, so the answer is kept for the process and, with ``shared``
    (a directory every process of a test session shares), for the whole session."""
    root = root or cache_root()
    key = f"{root}:{shared}"
    if key in _ENSURED:
        return _ENSURED[key]
    if shared is None:
        files = _ensure(say, root)
    else:
        shared.mkdir(parents=True, exist_ok=True)
        with open(shared / "guest-files.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = shared / "guest-files.json"
            if done.exists():
                files = GuestFiles.from_json(json.loads(done.read_text()))
            else:
                files = _ensure(say, root)
                done.write_text(json.dumps(files.to_json()))
    _ENSURED[key] = files
    return files


_ENSURED: dict[str, GuestFiles] = {}


def _ensure(say: Say, root: Path) -> GuestFiles:
    packages = choose_packages()
    origin = ", ".join(f"{p.name} {p.version}" for p in packages)
    target = root / _key(packages)
    files = GuestFiles(target / "vmlinuz", target / "initrd.gz", origin)
    if files.initrd.exists():
        return files
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GuestBuildError(f"cannot create the guest cache {root} ({e.strerror}); set "
                              "XDG_CACHE_HOME to a writable directory") from e
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this very guest
        if files.initrd.exists():
            return files
        say(f"building the test guest from {origin} into {target} (once)")
        _build(packages, target, say)
    return files


def _build(packages: Sequence[Package], target: Path, say: Say) -> None:
    with tmpdirs.temporary("guest", target.parent) as tmp:
        work = Path(tmp)
        say("apt-get download " + " ".join(p.name for p in packages))
        _run(["apt-get", "download", *(f"{p.name}={p.version}" for p in packages)],
             "apt-get download of " + ", ".join(p.name for p in packages), cwd=work)
        tree = work / "tree"
        for deb in sorted(work.glob("*.deb")):
            say(f"dpkg-deb -x {deb.name}")
            _run(["dpkg-deb", "-x", str(deb), str(tree)], f"dpkg-deb -x {deb.name}")
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{packages[0].name} has no /boot/vmlinuz-*")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        moddir = next((d for d in (tree / "lib/modules" / release,
                                   tree / "usr/lib/modules" / release) if d.is_dir()), None)
        if moddir is None:
            raise GuestBuildError(f"{packages[0].name} has no lib/modules/{release}")
        bb = next((p for p in (tree / "bin/busybox", tree / "usr/bin/busybox")
                   if p.exists()), None)
        if bb is None:
            raise GuestBuildError(f"{BUSYBOX_PACKAGE} has no bin/busybox")
        modules = resolve_modules(moddir, WANTED_MODULES)
        say("initramfs: busybox, /init, modules "
            + (" ".join(n for n, _ in modules) or "(none: built into the kernel)"))
        staging = work / "out"
        staging.mkdir()
        shutil.copyfile(vmlinuz[0], staging / "vmlinuz")
        (staging / "initrd.gz").write_bytes(initramfs(bb, modules))
        (staging / "manifest.json").write_text(json.dumps({
            "packages": [{"name": p.name, "version": p.version} for p in packages],
            "release": release, "modules": [n for n, _ in modules]}, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-built guest is never found
        say(f"guest ready: {target}")
