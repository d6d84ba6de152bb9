"""The qcow2 bitmaps extension clause by clause, on images the harness writes itself.

Every image starts as one ``qemu-img create`` made; ``harness/qcow2_writer.py`` then
encodes the bitmaps in one way ``docs/interop/qcow2.txt`` allows or forbids, and tells the
oracle every bit it encoded. A legal image is read back through every reader QEMU has:
``qemu-img info``, ``qemu-img check``, QEMU opening it read-only (the file must not
change) and read-write (a write lands, the bitmaps are stored at close), ``qemu-img
convert --bitmaps`` and ``qemu-img bitmap --merge``; each must see exactly the bits the
bytes say (the oracle checks live, on disk and the copies). A forbidden image must be
refused by every one of them with an error, and the file must be left as it was (hashed
before and after). ``docs/spec-coverage.md`` maps each clause to its test here.

Where QEMU accepts what the spec forbids, or refuses what it allows, the test states what
the spec says and is kept as a non-strict xfail with the versions it was seen on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.bitmaps import image_bitmaps, live_bitmaps
from harness.block import qcow2_node
from harness.errors import MachineError, ToolError
from harness.model import format_ranges
from harness.qcow2 import BME_FLAG_AUTO, BME_FLAG_IN_USE, Qcow2Image
from harness.qcow2_writer import BitmapSpec, Written, patch_header, write_bitmaps
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
DISK = "disk.qcow2"
B = BitmapSpec
AUTO, IN_USE, COMPAT = BME_FLAG_AUTO, BME_FLAG_IN_USE, 1 << 2
SEEN_ON = "seen on QEMU 7.2.22 and 10.0.2"


def craft(qio: Case, bitmaps: Sequence[BitmapSpec], *, size: int = SIZE,
          opts: Sequence[str] = (), why: str = "", **kw: Any) -> Written:
    """A fresh image with ``bitmaps`` written into it; the oracle learns what it holds."""
    qio.img.create(DISK, size, "qcow2", *opts)
    w = write_bitmaps(qio.path(DISK), bitmaps, **kw)
    qio.oracle.crafted(w, why or "bitmaps written by harness/qcow2_writer.py")
    cluster = f", cluster size {w.cluster_size}" if w.cluster_size != 65536 else ""
    qio.log.log(f"crafted: {len(bitmaps)} bitmap(s) on a {size:#x}-byte disk{cluster}, "
                f"autoclear bit 0 {'set' if w.autoclear else 'clear'}, directory "
                f"{w.directory_size} bytes")
    for spec, b in zip(bitmaps, w.bitmaps, strict=True):
        kinds = _kinds(spec, b)
        dirty = "undefined" if b.dirty is None else format_ranges(b.dirty)
        extra = f", extra data {len(b.extra_data)} bytes" if b.extra_data else ""
        qio.log.log(f"  {short(b.name)}: granularity_bits {b.granularity_bits}, flags "
                    f"{b.flags:#x}, type {b.type}, table {kinds}{extra}, dirty {dirty}")
    return w


def _kinds(spec: BitmapSpec, b: Any) -> str:
    named = [k if isinstance(k, str) else f"raw {k:#x}" for k in spec.entries]
    if len(named) < b.table_size:
        named += ["auto"] * (b.table_size - len(named))
    if len(named) > 6:
        return f"{b.table_size} entries ({len(b.data_offsets)} data clusters)"
    return "[" + ", ".join(named) + "]"


def short(name: str) -> str:
    return name if len(name) <= 24 else f"{name[:8]}...({len(name.encode())} bytes)"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def info_view(qio: Case, path: Path, w: Written) -> None:
    """``qemu-img info`` must list every bitmap with its granularity and flags."""
    seen = image_bitmaps(qio.img, path)
    for b in seen:
        qio.log.log(f"qemu-img info: {short(b.name)} granularity={b.granularity} "
                    f"flags=[{', '.join(b.flags)}]")
    want = sorted((b.name, b.granularity, b.in_use, b.auto) for b in w.bitmaps)
    got = sorted((b.name, b.granularity, "in-use" in b.flags, "auto" in b.flags) for b in seen)
    assert got == want, f"qemu-img info reads {got}, the bytes say {want}"


def check_view(qio: Case, path: Path, clean: bool = True) -> tuple[int, dict[str, Any]]:
    status, report = qio.img.check(path)
    qio.log.log(f"qemu-img check {path.name}: exit {status}, corruptions "
                f"{report.get('corruptions', 0)}, leaks {report.get('leaks', 0)}")
    if clean:
        assert status == 0, f"qemu-img check finds problems in a legal image: {report}"
    return status, report


def qemu_view(qio: Case, w: Written, read_only: bool, write: bool = False) -> None:
    """QEMU opens the image: every bitmap the bytes hold, in_use ones inconsistent, the
    others with exactly the encoded bits (checked by the oracle over NBD)."""
    vm = qio.vm("ro" if read_only else "rw", machine_type="none")
    vm.launch()
    vm.qmp_log("blockdev-add", qcow2_node(w.path, "disk", read_only=read_only))
    live = {lb.name: lb for lb in live_bitmaps(vm, "disk")}
    for lb in live.values():
        flags = [f for f in ("recording", "inconsistent") if getattr(lb, f)]
        qio.log.log(f"{vm.name}: {short(lb.name)} count={lb.count} granularity="
                    f"{lb.granularity} [{' '.join(flags) or '-'}]")
    if not live:
        qio.log.log(f"{vm.name}: no bitmaps")
    want = {b.name: b for b in w.bitmaps} if w.autoclear else {}
    assert sorted(live) == sorted(want), f"QEMU loads {sorted(live)}, the bytes hold " \
        f"{sorted(want)}"
    for name, b in want.items():
        got = live[name]
        assert got.granularity == b.granularity and got.persistent, got
        assert got.inconsistent == b.in_use, f"{name}: in_use is {b.in_use} on disk, " \
            f"QEMU says inconsistent={got.inconsistent}"
        if not b.in_use:
            assert got.recording == b.auto, f"{name}: auto is {b.auto}, QEMU says " \
                f"recording={got.recording}"
    if want:
        qio.oracle.check_exact(vm, "disk", sorted(want),
                               where="read-only" if read_only else "read-write")
    if want and not read_only:
        # "Flag 'in_use' should be set while the bitmap is not synced": on disk now
        on_disk = Qcow2Image.open(w.path)
        flagged = sorted(b.name for b in on_disk.bitmaps if b.in_use)
        qio.log.log(f"{vm.name}: in_use on disk while open: {', '.join(map(short, flagged))}")
        assert flagged == sorted(want), f"in_use on disk while QEMU has the image " \
            f"open read-write: {flagged}, expected {sorted(want)}"
    if write:
        off, proves = clean_granule(w)
        qio.log.log(f"{vm.name}: write at {off:#x}, a granule clean in "
                    f"{', '.join(map(short, proves))}: each must record it" if proves else
                    f"{vm.name}: write at {off:#x} (no bitmap is auto and consistent)")
        vm.qemu_io("disk", f"write -P 0x5a {off:#x} 0x200", log=True)
        qio.oracle.check_exact(vm, "disk", sorted(want), where="after a write")
    vm.shutdown()


def clean_granule(w: Written) -> tuple[int, list[str]]:
    """A 512-byte write inside the disk that lands in a granule the most enabled bitmaps
    (``auto``, not ``in_use``) have clean, and those bitmaps: after it, only a bitmap
    that really records can pass the exact check (a write into an already dirty granule
    proves nothing). Candidates: 0 and the first granule after each dirty range."""
    enabled = [b for b in w.bitmaps if b.auto and not b.in_use and b.dirty is not None]
    last = (w.virtual_size - 0x200) // 0x200 * 0x200
    candidates = {0, last}
    for b in enabled:
        for off, length in b.dirty or ():
            nxt = -(-(off + length) // b.granularity) * b.granularity
            if nxt <= last:
                candidates.add(nxt)

    def clean_in(off: int) -> list[str]:
        return [b.name for b in enabled
                if not any(o // b.granularity <= (off + 0x1ff) // b.granularity
                           and off // b.granularity <= (o + n - 1) // b.granularity
                           for o, n in b.dirty or ())]
    best = max(sorted(candidates), key=lambda off: len(clean_in(off)))
    return best, clean_in(best)


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def measure_view(qio: Case, w: Written) -> None:
    """``qemu-img measure``'s "bitmaps size" is what a copy's bitmaps may take: each
    bitmap QEMU loads fully allocated in 64 KiB clusters (the target's default), its
    table, and the directory, computed here from the encoding; the clusters ``convert
    --bitmaps`` really used for them (read from the copy) must fit in it."""
    res = qio.img.run("measure", "--output=json", "-O", "qcow2", DISK)
    got = json.loads(res.stdout).get("bitmaps")
    cs = 65536
    want, directory = 0, 0
    for b in w.bitmaps if w.autoclear else ():
        clusters = ceil_div(ceil_div(ceil_div(w.virtual_size, b.granularity), 8), cs)
        want += clusters * cs + ceil_div(clusters * 8, cs) * cs
        directory += ceil_div(24 + len(b.name.encode()), 8) * 8
    want += ceil_div(directory, cs) * cs
    copy = Qcow2Image.open(qio.path("copy.qcow2"))
    ext = copy.bitmaps_extension
    used = 0 if ext is None else ceil_div(ext.bitmap_directory_size, cs) * cs
    for cb in copy.bitmaps:
        used += ceil_div(cb.table_size * 8, cs) * cs
        used += cs * sum(1 for e in cb.table if e.kind == "data")
    qio.log.log(f"qemu-img measure: bitmaps size {got} (computed from the encoding "
                f"{want}); the copy's bitmaps use {used}")
    assert got == want, f"qemu-img measure says bitmaps size {got}, the encoding needs {want}"
    assert used <= got, f"convert --bitmaps used {used} bytes for bitmaps, measure said {got}"


def copies_view(qio: Case, w: Written) -> None:
    """``convert --bitmaps`` and ``bitmap --merge`` read the bitmaps into new images."""
    skip = ["--skip-broken-bitmaps"] if any(b.in_use for b in w.bitmaps) else []
    qio.img.run("convert", "-f", "qcow2", "-O", "qcow2", "--bitmaps", *skip, DISK,
                "copy.qcow2", log=True)
    if any(not b.in_use for b in w.bitmaps):
        qio.oracle.check_disk("copy.qcow2", where="convert --bitmaps copy", exact=True)
    measure_view(qio, w)
    usable = [b for b in w.bitmaps if not b.in_use]
    for b in usable[:1] + usable[1:][-1:]:
        qio.img.create("merged.qcow2", w.virtual_size)
        qio.img.run("bitmap", "--add", "-g", str(b.granularity), "merged.qcow2", "m")
        qio.img.run("bitmap", "--merge", b.name, "-b", DISK, "-F", "qcow2", "merged.qcow2",
                    "m")
        qio.oracle.check_disk("merged.qcow2", where=f"bitmap --merge {short(b.name)}",
                              exact=True)


def read_back(qio: Case, w: Written) -> None:
    """A legal image through every reader; only the read-write open may change it."""
    before = digest(w.path)
    qio.log.heading("qemu-img info, qemu-img check")
    info_view(qio, w.path, w)
    check_view(qio, w.path)
    qio.log.heading("QEMU opens it read-only")
    qemu_view(qio, w, read_only=True)
    qio.log.heading("qemu-img convert --bitmaps, qemu-img bitmap --merge")
    copies_view(qio, w)
    assert digest(w.path) == before, "reading the image changed it"
    qio.log.log("the image is unchanged")
    qio.log.heading("QEMU opens it read-write, writes, closes")
    qemu_view(qio, w, read_only=False, write=True)
    qio.oracle.check_disk(w.path, where="stored at close", exact=True)
    check_view(qio, w.path)


def refused(qio: Case, path: Path, what: str) -> None:
    """A forbidden image: every reader refuses it with an error; the file is unchanged."""
    before = digest(path)
    qio.log.heading(f"every reader must refuse it: {what}")
    problems = []
    res = qio.img.run("info", path.name, check=False)
    qio.log.log(f"qemu-img info: exit {res.status}: {first_line(res.stderr)}")
    if res.status == 0:
        problems.append("qemu-img info accepts it")
    res = qio.img.run("check", path.name, check=False)
    qio.log.log(f"qemu-img check: exit {res.status}: "
                f"{first_line(res.stderr) or first_line(res.stdout)}")
    if res.status == 0:
        problems.append("qemu-img check finds nothing wrong")
    vm = qio.vm("reader", machine_type="none")
    vm.launch()
    for ro in (True, False):
        reply = vm.qmp_log("blockdev-add", qcow2_node(path, "ro" if ro else "rw",
                                                      read_only=ro), check=False)
        if "error" not in reply:
            # stop here: closing it would let QEMU (and the oracle) act on the image
            problems.append(f"QEMU opens it {'read-only' if ro else 'read-write'}")
            raise AssertionError(f"{what}: " + "; ".join(problems))
    vm.shutdown()
    changed = digest(path) != before
    qio.log.log("the image is " + ("CHANGED" if changed else "unchanged"))
    if changed:
        problems.append("the file changed")
    assert not problems, f"{what}: " + "; ".join(problems)


def first_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].removeprefix("qemu-img: ") if lines else ""


# -- legal encodings -----------------------------------------------------------------------

LEGAL: dict[str, dict[str, Any]] = {
    "one-bitmap": dict(bitmaps=[B("b0", dirty=[(0, 0x10000), (0x200000, 1)])]),
    "table-entry-kinds": dict(
        bitmaps=[B("b0", 9, dirty=[(0x300000, 0x80000), (0x700200, 0x200)],
                   entries=["zeroes", "ones", "data", "data", "zeroes"])],
        size=10 << 20, opts=["cluster_size=512"]),
    "flags-auto-and-not": dict(bitmaps=[B("on", dirty=[(0, 1)]),
                                        B("off", flags=0, dirty=[(0x100000, 1)])]),
    "flags-in-use": dict(bitmaps=[B("stale", flags=IN_USE | AUTO, dirty=[(0, 1)]),
                                  B("stale-off", flags=IN_USE),
                                  B("fine", dirty=[(0x10000, 1)])]),
    "in-use-with-outdated-size": dict(bitmaps=[B("old", 9, flags=IN_USE, table_size=1)],
                                      opts=["cluster_size=512"]),
    "granularity-9-and-31": dict(bitmaps=[B("g9", 9, dirty=[(0x1ff, 2)]),
                                          B("g31", 31, dirty=[(0x3fffff, 1)])],
                                 size=SIZE + 0x1234),
    "name-lengths-1-and-1023": dict(bitmaps=[B("a", dirty=[(0, 1)]),
                                             B("n" * 1023, dirty=[(0x10000, 1)])]),
    "name-utf8": dict(bitmaps=[B("bitmap-\u00e9t\u00e9-\u2603", dirty=[(0, 1)])]),
    "directory-spans-clusters": dict(
        bitmaps=[B(f"bitmap-{i:02d}", 9 + i % 4, dirty=[(i << 18, 0x1000)])
                 for i in range(24)], opts=["cluster_size=512"]),
    "table-spans-clusters": dict(
        bitmaps=[B("big", 9, dirty=[(0, 0x1000), (0xfff0000, 0x10000)])],
        size=256 << 20, opts=["cluster_size=512"]),
    "extension-first": dict(bitmaps=[B("b0", dirty=[(0, 1)])], ext_first=True),
    "refcount-bits-1": dict(bitmaps=[B("b0", 12, dirty=[(0, 1)], entries=["data"])],
                            opts=["refcount_bits=1"]),
    "refcount-bits-64": dict(bitmaps=[B("b0", 12, dirty=[(0, 1)])],
                             opts=["refcount_bits=64"]),
}


@pytest.mark.parametrize("clause", sorted(LEGAL))
def test_legal(qio: Case, clause: str) -> None:
    w = craft(qio, **LEGAL[clause])
    read_back(qio, w)


def test_autoclear_cleared_by_a_program_without_bitmaps(qio: Case) -> None:
    """Autoclear bit 0 clear with the extension present: the data "must be considered
    inconsistent". QEMU loads no bitmap, and a read-write open drops the extension (its
    clusters are then leaked, which qemu-img check reports)."""
    w = craft(qio, [B("b0", dirty=[(0, 1)])], autoclear=False)
    before = digest(w.path)
    assert not image_bitmaps(qio.img, w.path)
    qio.log.log("qemu-img info: no bitmaps")
    qemu_view(qio, w, read_only=True)
    assert digest(w.path) == before
    qemu_view(qio, w, read_only=False)
    image = Qcow2Image.open(w.path)
    qio.log.log(f"after the read-write open: bitmaps extension "
                f"{'present' if image.bitmaps_extension else 'gone'}, autoclear bit 0 "
                f"{'set' if image.header.bitmaps_autoclear else 'clear'}")
    assert not image.bitmaps_consistent
    _, report = check_view(qio, w.path, clean=False)
    assert report.get("corruptions", 0) == 0


def test_unknown_autoclear_bit_is_cleared_by_a_writer(qio: Case) -> None:
    """An unknown autoclear bit: a program "may only write to an image with unknown
    auto-clear features if it clears the respective bits from this field first". QEMU
    opening read-only must leave it; read-write must clear it and keep bit 0."""
    w = craft(qio, [B("b0", dirty=[(0, 0x1000)])])
    patch_header(w.path, "autoclear_features", 1 | 1 << 5)
    qio.log.log("autoclear_features set to 0x21 (bit 5 unknown to everyone)")
    qemu_view(qio, w, read_only=True)
    flags = Qcow2Image.open(w.path).header.autoclear_features
    qio.log.log(f"after the read-only open: autoclear_features {flags:#x}")
    assert flags == 0x21
    qemu_view(qio, w, read_only=False)
    flags = Qcow2Image.open(w.path).header.autoclear_features
    qio.log.log(f"after the read-write open: autoclear_features {flags:#x}")
    assert flags == 0x1
    check_view(qio, w.path)


def test_v2_image_bitmaps_are_never_consistent(qio: Case) -> None:
    """A version 2 header has no autoclear field, so nothing can vouch for the
    extension: QEMU must treat its bitmaps as inconsistent (it ignores them)."""
    w = craft(qio, [B("b0", dirty=[(0, 1)])], opts=["compat=0.10"])
    assert not w.autoclear
    before = digest(w.path)
    qemu_view(qio, w, read_only=True)
    assert digest(w.path) == before


def test_many_bitmaps(qio: Case) -> None:
    """4096 bitmaps in a directory of 128 KiB (256 clusters of 512 bytes): all load.
    (65535, QEMU's maximum, is left out: qemu-img check alone took 4 minutes here; the
    oracle is not told of these empty bitmaps, checking 4096 over NBD would take long.)"""
    names = [f"{i:04x}" for i in range(4096)]
    qio.img.create(DISK, 1 << 20, "qcow2", "cluster_size=512")
    w = write_bitmaps(qio.path(DISK), [B(n, 31, flags=0) for n in names])
    qio.oracle.edited_by_hand(DISK, "4096 empty bitmaps, granularity 2 GiB")
    qio.log.log(f"crafted: {len(names)} empty disabled bitmaps, directory "
                f"{w.directory_size} bytes")
    before = digest(w.path)
    check_view(qio, w.path)
    assert sorted(b.name for b in image_bitmaps(qio.img, w.path)) == names
    qio.log.log(f"qemu-img info: {len(names)} bitmaps")
    vm = qio.vm("ro", machine_type="none")
    vm.launch()
    vm.qmp_log("blockdev-add", qcow2_node(w.path, "disk", read_only=True))
    live = live_bitmaps(vm, "disk")
    qio.log.log(f"QEMU loads {len(live)} bitmaps, "
                f"{sum(b.count for b in live)} dirty bytes in all")
    assert sorted(b.name for b in live) == names
    assert not any(b.count or b.recording or b.inconsistent for b in live)
    vm.shutdown()
    assert digest(w.path) == before


# -- forbidden encodings -------------------------------------------------------------------

def _unaligned_dir(w: Written) -> None:
    w.patch_ext("bitmap_directory_offset", w.directory_offset + 8)


def _dir_size(delta: int) -> Any:
    def patch(w: Written) -> None:
        w.patch_ext("bitmap_directory_size", w.directory_size + delta)
    return patch


FORBIDDEN: dict[str, dict[str, Any]] = {
    "extension-length-16": dict(ext_length=16),
    "extension-length-32": dict(ext_length=32),
    "nb-bitmaps-0": dict(nb_bitmaps=0),
    "nb-bitmaps-more-than-entries": dict(nb_bitmaps=2),
    "nb-bitmaps-fewer-than-entries": dict(bitmaps=[B("b0"), B("b1")], nb_bitmaps=1),
    "extension-reserved-nonzero": dict(ext_reserved=1),
    "directory-offset-unaligned": dict(patch=_unaligned_dir),
    "directory-size-larger": dict(patch=_dir_size(8)),
    "directory-size-smaller": dict(patch=_dir_size(-8)),
    "directory-size-zero": dict(patch=lambda w: w.patch_ext("bitmap_directory_size", 0)),
    "table-offset-unaligned": dict(bitmaps=[B("b0", table_offset=0x50200)]),
    "table-offset-zero": dict(bitmaps=[B("b0", table_offset=0)]),
    "table-size-zero": dict(bitmaps=[B("b0", table_size=0)]),
    "table-size-too-small": dict(bitmaps=[B("b0", 9, table_size=1)],
                                 opts=["cluster_size=512"]),
    "table-size-too-large": dict(bitmaps=[B("b0", table_size=2)]),
    "flags-reserved-bit-3": dict(bitmaps=[B("b0", flags=AUTO | 1 << 3)]),
    "flags-reserved-bit-31": dict(bitmaps=[B("b0", flags=AUTO | 1 << 31)]),
    "type-0": dict(bitmaps=[B("b0", type=0)]),
    "type-2": dict(bitmaps=[B("b0", type=2)]),
    "granularity-bits-64": dict(bitmaps=[B("b0", 64)]),
    "name-size-0": dict(bitmaps=[B("b0", name_size=0)]),
    "name-duplicated": dict(bitmaps=[B("b0", dirty=[(0, 1)]), B("b0")]),
    "unusable-extra-data-3-bytes": dict(bitmaps=[B("b0", extra_data=b"\x01\x02\x03")]),
    "unusable-extra-data-8-bytes": dict(bitmaps=[B("b0", extra_data=bytes(range(8)))]),
    "table-entry-reserved-bit-1": dict(bitmaps=[B("b0", entries=[1 << 1])]),
    "table-entry-reserved-bit-56": dict(bitmaps=[B("b0", entries=[1 << 56])]),
    "table-entry-offset-with-bit-0": dict(bitmaps=[B("b0", entries=[0x30000 | 1])]),
    "table-entry-offset-unaligned": dict(bitmaps=[B("b0", entries=[0x30200])]),
    # QEMU's documented limits (the spec's notes): legal, but QEMU must refuse them
    "qemu-limit-granularity-bits-8": dict(bitmaps=[B("b0", 8)]),
    "qemu-limit-granularity-bits-0": dict(bitmaps=[B("b0", 0)], size=0x10000),
    "qemu-limit-granularity-bits-32": dict(bitmaps=[B("b0", 32)]),
    "qemu-limit-granularity-bits-63": dict(bitmaps=[B("b0", 63)]),
    "qemu-limit-name-1024": dict(bitmaps=[B("n" * 1024)]),
    "qemu-limit-nb-bitmaps-65536": dict(nb_bitmaps=65536),
}


def _autoclear_only(w: Written) -> None:
    patch_header(w.path, "autoclear_features", 1)


#: forbidden encodings QEMU accepts: known QEMU bugs (the reason says what the spec says)
ACCEPTED_BY_QEMU: dict[str, tuple[dict[str, Any], str]] = {
    "extension-twice": (dict(ext_copies=2), (
        "'each header extension type shall appear at most once', but QEMU, qemu-img info "
        "and check accept two bitmaps extensions (the last one read wins)")),
    "name-duplicated-second-in-use": (
        dict(bitmaps=[B("b0", dirty=[(0, 1)]), B("b0", flags=IN_USE)]), (
            "names 'must be unique', but when the second entry is in_use QEMU skips it "
            "(qcow2_load_dirty_bitmaps takes it for a bitmap being migrated) and qemu-img "
            "info and check accept the image; the duplicate stays for good")),
    "entry-padding-nonzero": (dict(bitmaps=[B("b0", padding=b"\xff" * 8)]), (
        "'all bytes of the padding must be zero', but QEMU and qemu-img check accept "
        "non-zero padding (QEMU zeroes it when it next stores the directory)")),
    "tail-bits-set": (dict(bitmaps=[B("b0", 9, dirty=[(0, 1)], tail_ones=True)],
                           size=1000000), (
        "the unused tail bits of the last bitmap cluster 'must be zero', but QEMU and "
        "qemu-img check accept them set (QEMU ignores them)")),
    "autoclear-bit-without-extension": (dict(bitmaps=[], patch=_autoclear_only), (
        "'It is an error if this bit is set without the bitmaps extension present', but "
        "QEMU, qemu-img info and check accept it, and QEMU keeps the bit")),
}


def _forbidden_params() -> list[Any]:
    params: list[Any] = [pytest.param(c, FORBIDDEN[c], id=c) for c in sorted(FORBIDDEN)]
    for clause, (kw, why) in sorted(ACCEPTED_BY_QEMU.items()):
        mark = pytest.mark.xfail(raises=AssertionError, strict=False,
                                 reason=f"QEMU bug ({SEEN_ON}): {why}")
        params.append(pytest.param(clause, kw, id=clause, marks=mark))
    return params


@pytest.mark.parametrize(("clause", "encoding"), _forbidden_params())
def test_refused(qio: Case, clause: str, encoding: dict[str, Any]) -> None:
    kw = dict(encoding)
    patch = kw.pop("patch", None)
    bitmaps = kw.pop("bitmaps", [B("b0", dirty=[(0, 1)])])
    w = craft(qio, bitmaps, why="a forbidden encoding", **kw)
    if patch is not None:
        patch(w)
    refused(qio, w.path, clause)


# -- QEMU's deviations from the spec, kept as known QEMU bugs -----------------------------

@pytest.mark.xfail(raises=AssertionError, strict=False, reason=(
    f"QEMU bug ({SEEN_ON}): a bitmap data cluster that is the active L1 table (refcount "
    "1, referenced twice; qemu-img check reports it) is opened read-write without a "
    "check; storing the bitmap at close frees the L1 table's cluster, and the next "
    "allocating write marks the image corrupt"))
def test_bitmap_cluster_overlapping_l1_table_is_refused(qio: Case) -> None:
    qio.img.create(DISK, SIZE)
    l1 = Qcow2Image.open(qio.path(DISK)).header.l1_table_offset
    w = craft(qio, [B("b0", entries=[l1])], why="forbidden")
    refused(qio, w.path, "bitmap data cluster is the L1 table")


@pytest.mark.xfail(raises=ToolError, strict=False, reason=(
    f"QEMU bug ({SEEN_ON}): flag bit 2 (extra_data_compatible) is defined by the spec, "
    "but QEMU counts it among the reserved flags (BME_RESERVED_FLAGS) and refuses the "
    "image; qemu-img info fails"))
def test_extra_data_compatible_flag_without_extra_data(qio: Case) -> None:
    w = craft(qio, [B("b0", flags=AUTO | COMPAT, dirty=[(0, 1)])])
    read_back(qio, w)


@pytest.mark.xfail(raises=ToolError, strict=False, reason=(
    f"QEMU bug ({SEEN_ON}): extra data with extra_data_compatible set: 'the bitmap may "
    "be used as expected, extra data must be left as is', but QEMU refuses every image "
    "with extra data ('Bitmap extra data is not supported')"))
def test_extra_data_compatible_is_usable(qio: Case) -> None:
    w = craft(qio, [B("b0", flags=AUTO | COMPAT, extra_data=b"\x01\x02\x03",
                      dirty=[(0, 1)])])
    before = digest(w.path)
    info_view(qio, w.path, w)
    qemu_view(qio, w, read_only=True)
    assert digest(w.path) == before


@pytest.mark.xfail(raises=AssertionError, strict=False, reason=(
    f"QEMU bug ({SEEN_ON}): an all-ones table entry for the last, partly used cluster "
    "sets whole 64-bit words in RAM (hbitmap_deserialize_ones rounds up), so bits past "
    "the disk's end are set: x-debug-block-dirty-bitmap-sha256 hashes them, and QEMU "
    "stores them in the data cluster it writes at close, where 'these bits must be zero'"))
def test_all_ones_last_entry_leaves_tail_bits_zero(qio: Case) -> None:
    w = craft(qio, [B("b0", 9, entries=["ones"])], size=1000000)
    qemu_view(qio, w, read_only=False)
    stored = Qcow2Image.open(w.path).bitmap("b0")
    data = stored.clusters[-1] or b""
    granules = stored.nb_granules - (len(stored.clusters) - 1) * w.cluster_size * 8
    tail = int.from_bytes(data, "little") >> granules
    qio.log.log(f"stored at close: tail bits after granule {stored.nb_granules}: "
                f"{tail:#x}")
    assert tail == 0, f"QEMU stored tail bits {tail:#x} after the last granule"


def test_writer_output_reads_back(qio: Case) -> None:
    """The independent reader sees what the writer says it wrote (a cheap guard that a
    golden failure elsewhere is QEMU's, not the writer's)."""
    w = craft(qio, [B("b0", 9, dirty=[(0x1000, 0x2000)], entries=["data"]),
                    B("b1", flags=0, entries=["ones"])])
    image = Qcow2Image.open(w.path)
    for b in w.bitmaps:
        got = image.bitmap(b.name)
        assert (got.flags, got.granularity_bits) == (b.flags, b.granularity_bits)
        assert tuple(got.dirty_ranges()) == b.dirty
    header = struct.unpack(">Q", w.path.read_bytes()[88:96])[0]
    assert header & 1
    qio.log.log("the reader agrees with the writer")


# -- what QEMU does after it opened an image --------------------------------------------

def qemu_stderr(qio: Case, vm: VM, pattern: str) -> str:
    """The first line of QEMU's own stderr (its log) containing ``pattern``, logged."""
    for line in vm.log_path.read_text(errors="replace").splitlines():
        if pattern in line:
            said = line.split(": ", 1)[-1].replace(str(qio.scratch), "TEST_DIR")
            qio.log.log(f"QEMU: {said}")
            return said
    return ""


def test_resize_with_an_inconsistent_bitmap(qio: Case) -> None:
    """A disk whose image holds an in_use bitmap (QEMU loads it inconsistent) cannot be
    resized: QEMU could not resize what it cannot trust. The refusal leaves the disk and
    the image as they were; once the bad bitmap is removed (also from the image) the
    resize goes through, the good bitmap grows with the disk and records a write in the
    new part, and is stored exactly at close."""
    w = craft(qio, [B("fine", dirty=[(0, 0x10000)]), B("stale", flags=IN_USE | AUTO)])
    vm = qio.vm("rw", machine_type="none")
    vm.launch()
    vm.qmp_log("blockdev-add", qcow2_node(w.path, "disk"))
    vm.qmp_log("block_resize", node_name="disk", size=2 * SIZE, expect_error="inconsistent")
    size = Qcow2Image.open(w.path).header.virtual_size
    qio.log.log(f"virtual size in the header: {size:#x}")
    assert size == SIZE
    qio.check_live(vm, "disk", where="after the refused resize")
    vm.qmp_log("block-dirty-bitmap-remove", node="disk", name="stale")
    vm.qmp_log("block_resize", node_name="disk", size=2 * SIZE)
    vm.qemu_io("disk", f"write -P 0x5a {SIZE + 0x10000:#x} 0x200", log=True)
    qio.oracle.check_exact(vm, "disk", ["fine"], where="after the resize and a write")
    vm.shutdown()
    qio.oracle.check_disk(w.path, where="stored at close", exact=True)
    check_view(qio, w.path)


def test_duplicate_in_use_entry_after_the_open(qio: Case) -> None:
    """The image ``test_refused[name-duplicated-second-in-use]`` shows QEMU accepting: two
    entries named b0, the second in_use. QEMU loads the first and skips the second. What
    must hold afterwards: a read-write reopen that finds the second entry contradicting
    the first is refused for the bitmaps (they stay read-only, so no write goes
    unrecorded); after b0 is removed, the entry left behind blocks a resize and a
    read-write reopen rather than being ignored; a new persistent b0 then replaces it at
    close, and the image is legal again with exactly what the new b0 recorded."""
    qio.img.create(DISK, SIZE)
    w = write_bitmaps(qio.path(DISK), [B("b0", dirty=[(0, 1)]), B("b0", flags=IN_USE)])
    qio.oracle.edited_by_hand(DISK, "two entries named b0 (the reader refuses it)")
    qio.log.log("crafted: two entries named b0; the first auto with [0x0+0x10000], the "
                "second in_use")
    before = digest(w.path)

    qio.log.heading("open read-only, reopen read-write: the bitmaps stay read-only")
    vm = qio.vm("ro", machine_type="none")
    vm.launch()
    vm.qmp_log("blockdev-add", qcow2_node(w.path, "disk", read_only=True))
    vm.blockdev_reopen(qcow2_node(w.path, "disk"))
    said = qemu_stderr(qio, vm, "Failed to make dirty bitmaps writable")
    assert "marked IN_USE" in said, f"QEMU said {said!r}"
    with pytest.raises(MachineError) as refused_write:
        vm.qemu_io("disk", "write 0x100000 0x200")
    qio.log.log(f"qemu-io disk: write 0x100000 0x200: refused "
                f"({refused_write.value.reason.rsplit(': ', 1)[-1]})")
    (b0,) = qio.show_bitmaps(vm, "disk")
    assert b0.count == 0x10000 and not b0.inconsistent
    vm.shutdown()
    assert digest(w.path) == before, "the image changed"
    qio.log.log("the image is unchanged")
    qio.oracle.crafted(dataclasses.replace(w, bitmaps=w.bitmaps[:1]),
                       "QEMU loads the first b0 and skips the second")

    qio.log.heading("open read-write, remove b0: the second entry stays")
    vm = qio.vm("rw", machine_type="none")
    vm.launch()
    vm.qmp_log("blockdev-add", qcow2_node(w.path, "disk"))
    vm.qmp_log("block-dirty-bitmap-remove", node="disk", name="b0")
    left = [(b.name, b.in_use) for b in Qcow2Image.open(w.path).bitmaps]
    qio.log.log(f"entries in the image: {left}")
    assert left == [("b0", True)]
    vm.qmp_log("block_resize", node_name="disk", size=2 * SIZE, expect_error="not loaded")
    vm.blockdev_reopen(qcow2_node(w.path, "disk", read_only=True))
    vm.blockdev_reopen(qcow2_node(w.path, "disk"))
    said = qemu_stderr(qio, vm, "Failed to make dirty bitmaps writable")
    assert "Unexpected bitmap 'b0'" in said, f"QEMU said {said!r}"

    qio.log.heading("a new persistent b0 replaces the entry at close")
    vm.qmp_log("block-dirty-bitmap-add", node="disk", name="b0", persistent=True)
    vm.qemu_io("disk", "write -P 0x5a 0x200000 0x200", log=True)
    vm.shutdown()
    entries = [(b.name, b.in_use) for b in Qcow2Image.open(w.path).bitmaps]
    qio.log.log(f"entries in the image: {entries}")
    assert entries == [("b0", False)]
    qio.oracle.check_disk(w.path, where="stored at close", exact=True)
    check_view(qio, w.path)


def test_check_reads_the_table_qemu_skips(qio: Case) -> None:
    """The open never reads the table of the duplicate in_use entry it skips, so only
    ``qemu-img check`` can see that entry's broken table (a reserved bit set): it must
    not pass the image (QEMU's check stops there: "Check failed: Invalid argument")."""
    qio.img.create(DISK, SIZE)
    write_bitmaps(qio.path(DISK), [B("b0", dirty=[(0, 1)]),
                                   B("b0", flags=IN_USE, entries=[1 << 1])])
    qio.oracle.edited_by_hand(DISK, "two entries named b0, the second's table broken")
    qio.log.log("crafted: two entries named b0; the second in_use, its table entry 0x2")
    res = qio.img.run("check", DISK, check=False)
    qio.log.log(f"qemu-img check: exit {res.status}: "
                f"{first_line(res.stderr) or first_line(res.stdout)}")
    assert res.status != 0, "qemu-img check passes an image with a broken bitmap table"
