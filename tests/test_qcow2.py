"""Check harness.qcow2 against images QEMU really wrote and against ``qemu-img info``.

Every expectation comes from outside the parser: the writes the test issued (rounded out to
the bitmap granularity), the ``count`` QEMU reports over QMP while the bitmap is live, and
the bitmap list ``qemu-img info`` prints. QEMU is driven through a bare QMP unix socket
with ``-machine none``; data is written with the HMP ``qemu-io`` command so it goes through
the block layer and is recorded by the dirty bitmaps.

Set QIOTESTS_QCOW2_QEMU_DIR to a directory holding qemu-img and qemu-system-x86_64 to test
another QEMU build; by default the ones on PATH are used.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from harness.bitmaps import live_bitmaps
from harness.block import blockdev, qcow2_node
from harness.errors import HarnessError, Qcow2FormatError
from harness.model import Extents
from harness.qcow2 import BitmapNotFoundError, Qcow2Image
from harness.vm import VM

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

QEMU_DIR = os.environ.get("QIOTESTS_QCOW2_QEMU_DIR", "")
ENV = {**os.environ, "LANG": "C", "LC_ALL": "C"}
Writes = Sequence[tuple[int, int]]


def tool(name: str) -> str:
    path = os.path.join(QEMU_DIR, name) if QEMU_DIR else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"{name} not found (QIOTESTS_QCOW2_QEMU_DIR={QEMU_DIR!r})")
    return path


def qemu_img(*args: str | Path) -> str:
    argv = [tool("qemu-img"), *map(str, args)]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{argv} failed: {proc.stderr}"
    return proc.stdout


def create(path: Path, size: int, *options: str) -> Path:
    qemu_img("create", "-f", "qcow2", *options, path, str(size))
    return path


def info(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path))
    return data


def info_bitmaps(path: Path) -> list[tuple[str, int, set[str]]]:
    bitmaps = info(path)["format-specific"]["data"].get("bitmaps", [])
    return [(b["name"], b["granularity"], set(b["flags"])) for b in bitmaps]


def parsed_bitmaps(image: Qcow2Image) -> list[tuple[str, int, set[str]]]:
    """The parser's view in qemu-img info's vocabulary."""
    return [
        (b.name, b.granularity, {f for f, on in (("in-use", b.in_use), ("auto", b.auto)) if on})
        for b in image.bitmaps
    ]


def expected_ranges(writes: Writes, granularity: int, size: int) -> list[tuple[int, int]]:
    """What a bitmap must say after ``writes``: each rounded out to granules, then merged."""
    return list(Extents(writes).rounded(granularity, size))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class Qemu:
    """The image as node "disk" in a ``-machine none`` QEMU (a harness VM), with the
    few calls these tests need; the VM is always stopped on exit from the ``with``."""

    def __init__(self, image: Path, log: Path, read_only: bool = False) -> None:
        node = qcow2_node(image, "disk", read_only=read_only)
        self.vm = VM(log.stem, tool("qemu-system-x86_64"), scratch=log.parent,
                     machine_type="none", args=blockdev(node))
        self.vm.launch()

    def cmd(self, command: str, **arguments: Any) -> Any:
        return self.vm.qmp(command, **arguments)

    def io(self, command: str) -> None:
        self.vm.qemu_io("disk", command)

    def counts(self) -> dict[str, int]:
        return {b.name: b.count for b in live_bitmaps(self.vm, "disk")}

    def quit(self, writes: int = 0) -> None:
        """Quit cleanly (QEMU stores the bitmaps) and check ``writes`` qemu-io writes worked."""
        assert self.vm.shutdown() == 0
        log = self.vm.log_path.read_text()
        assert log.count("wrote ") == writes, f"some qemu-io write failed:\n{log}"

    def sigkill(self) -> None:
        self.vm.kill()

    def __enter__(self) -> Qemu:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.vm.shutdown(check=False)


@pytest.mark.parametrize(
    ("options", "version"),
    [
        (["-o", "compat=0.10"], 2),
        (["-o", "cluster_size=4096,refcount_bits=64,lazy_refcounts=on"], 3),
        (["-o", "compression_type=zstd"], 3),
        (["-b", "BASE", "-F", "qcow2"], 3),
    ],
)
def test_header_without_bitmaps(tmp_path: Path, options: list[str], version: int) -> None:
    base = create(tmp_path / "base.qcow2", 5 * GiB + 512)
    options = [str(base) if o == "BASE" else o for o in options]
    path = create(tmp_path / "img.qcow2", 5 * GiB + 512, *options)
    image, data = Qcow2Image.open(path), info(path)
    specific = data["format-specific"]["data"]
    h = image.header
    assert h.version == version == (2 if specific["compat"] == "0.10" else 3)
    assert h.cluster_size == data["cluster-size"]
    assert h.virtual_size == data["virtual-size"] == 5 * GiB + 512
    assert 1 << h.refcount_order == specific.get("refcount-bits", 16)
    assert bool(h.compatible_features & 1) == specific.get("lazy-refcounts", False)
    assert bool(h.incompatible_features & 8) == (specific.get("compression-type") == "zstd")
    assert h.dirty is data.get("dirty-flag", False) is False
    assert h.header_length == (72 if version == 2 else 112)
    assert image.bitmaps_extension is None and image.bitmaps == ()
    assert not image.bitmaps_consistent
    exts = {e.name: e.data for e in image.extensions}
    if "-b" in options:
        assert exts["backing-format"] == b"qcow2"
        assert h.backing_file_size == len(str(base))
    # QEMU writes the feature name table into v3 headers, except with small clusters.
    assert ("feature-table" in exts) == (version == 3 and h.cluster_size == 64 * KiB)


def test_several_bitmaps_and_granularities(tmp_path: Path) -> None:
    size = 200 * MiB + 512  # so the last granule of every bitmap but g512 is clipped
    path = create(tmp_path / "img.qcow2", size)
    for bitmap, gran_arg in [("g512", "512"), ("g2m", "2M"), ("g64m", "64M"), ("paused", "4K")]:
        qemu_img("bitmap", "--add", "-g", gran_arg, path, bitmap)
    qemu_img("bitmap", "--add", path, "g64k")  # QEMU's default granularity
    qemu_img("bitmap", "--add", "--disable", path, "off")
    # Granule 13 of g512 is bit 5 of byte 1: a parser with the wrong bit order misses it.
    before = [(0, 1), (13 * 512, 512), (1 * MiB + 100, 3000), (150 * MiB - 1, 2), (size - 1, 1)]
    after = [(64 * MiB + 4096, 4096)]
    with Qemu(path, tmp_path / "qemu.log") as vm:
        for off, n in before:
            vm.io(f"write -P 0x11 {off} {n}")
        vm.cmd("block-dirty-bitmap-disable", node="disk", name="paused")
        for off, n in after:
            vm.io(f"write -P 0x22 {off} {n}")
        counts = vm.counts()
        vm.quit(writes=len(before) + len(after))

    image = Qcow2Image.open(path)
    assert parsed_bitmaps(image) == info_bitmaps(path)  # same names, order, granularity, flags
    assert image.bitmaps_consistent and image.header.bitmaps_autoclear
    assert image.bitmaps_extension is not None and image.bitmaps_extension.nb_bitmaps == 6
    grans = {"g512": 512, "g64k": 64 * KiB, "g2m": 2 * MiB, "g64m": 64 * MiB, "paused": 4096}
    for name, gran in grans.items():
        bm = image.bitmap(name)
        writes = before if name == "paused" else [*before, *after]
        assert bm.granularity == gran
        assert bm.usable and not bm.in_use
        assert bm.auto is (name != "paused")
        assert bm.dirty_ranges() == expected_ranges(writes, gran, size), name
        assert bm.dirty_bytes() == counts[name], name
    # All four 64M granules are dirty; the last one reaches almost 64M past the end of the
    # disk: QEMU counts it whole, the ranges stop at the disk end.
    g64m = image.bitmap("g64m")
    assert g64m.dirty_ranges() == [(0, size)]
    assert g64m.dirty_bytes() == 4 * 64 * MiB
    disabled = image.bitmap("off")
    assert disabled.dirty_ranges() == [] and disabled.dirty_bytes() == counts["off"] == 0
    assert not disabled.auto and all(e.kind == "zeroes" for e in disabled.table)


def test_large_image_bitmap_spans_many_table_entries(tmp_path: Path) -> None:
    size = 64 * GiB - 64 * KiB  # the last table entry covers only part of 256 MiB
    path = create(tmp_path / "big.qcow2", size)
    qemu_img("bitmap", "--add", "-g", "512", path, "fine")
    per_entry = 64 * KiB * 8 * 512  # guest bytes one 64 KiB bitmap cluster covers
    writes = [
        (0, 512),
        (per_entry + 13 * 512, 1),
        (2 * per_entry - 512, 1024),  # crosses from table entry 1 into entry 2
        (40 * GiB + 7, 5000),
        (size - 512, 512),  # the very last granule
    ]
    with Qemu(path, tmp_path / "qemu.log") as vm:
        for off, n in writes:
            vm.io(f"write -P 0x33 {off} {n}")
        counts = vm.counts()
        vm.quit(writes=len(writes))

    bm = Qcow2Image.open(path).bitmap("fine")
    assert bm.table_size == len(bm.table) == 256
    data_entries = [i for i, e in enumerate(bm.table) if e.kind == "data"]
    assert data_entries == [0, 1, 2, 40 * GiB // per_entry, 255]
    assert all(e.kind == "zeroes" for i, e in enumerate(bm.table) if i not in data_entries)
    assert bm.dirty_ranges() == expected_ranges(writes, 512, size)
    assert (2 * per_entry - 512, 1024) in bm.dirty_ranges()  # merged across two clusters
    assert bm.dirty_ranges()[-1] == (size - 512, 512)
    assert bm.dirty_bytes() == counts["fine"]


def test_full_disk_bitmap_is_stored_as_ff_data_clusters(tmp_path: Path) -> None:
    size = 3 * GiB + 64 * KiB + 512
    path = create(tmp_path / "full.qcow2", size)
    qemu_img("bitmap", "--add", "-g", "512", path, "full")
    chunks = [(off, min(GiB, size - off)) for off in range(0, size, GiB)]
    with Qemu(path, tmp_path / "qemu.log") as vm:
        for off, n in chunks:
            vm.io(f"write -z {off} {n}")
        counts = vm.counts()
        vm.quit(writes=len(chunks))

    bm = Qcow2Image.open(path).bitmap("full")
    granules = size // 512
    assert counts["full"] == granules * 512
    # QEMU 7.2 and 10.0 never use the "all ones" table entry flag: they allocate and write
    # a cluster of 0xff bytes even when the whole cluster is set.
    assert [e.kind for e in bm.table] == ["data"] * 13
    data = b"".join(c or b"" for c in bm.clusters)
    assert data == b"\xff" * (granules // 8) + bytes([(1 << granules % 8) - 1])
    assert bm.dirty_ranges() == [(0, size)]
    assert bm.dirty_bytes() == counts["full"]


def test_all_ones_table_entries(tmp_path: Path) -> None:
    # QEMU never writes "all ones" entries (see the test above), so make some by hand: turn
    # two all-zeroes entries of an empty bitmap into 1 (offset 0, bit 0 set). No cluster is
    # orphaned, so the image stays clean and QEMU itself can confirm what they mean.
    size = 64 * GiB - 64 * KiB
    path = create(tmp_path / "ones.qcow2", size)
    qemu_img("bitmap", "--add", "-g", "512", path, "ones")
    bm = Qcow2Image.open(path).bitmap("ones")
    assert bm.dirty_ranges() == [] and {e.kind for e in bm.table} == {"zeroes"}
    for index in (1, 255):
        patch(path, bm.table_offset + 8 * index, struct.pack(">Q", 1))
    qemu_img("check", path)

    bm = Qcow2Image.open(path).bitmap("ones")
    per_entry = 64 * KiB * 8 * 512
    assert [i for i, e in enumerate(bm.table) if e.kind == "ones"] == [1, 255]
    assert bm.dirty_ranges() == [(per_entry, per_entry), (255 * per_entry, size - 255 * per_entry)]
    with Qemu(path, tmp_path / "qemu.log", read_only=True) as vm:
        assert vm.counts()["ones"] == bm.dirty_bytes() == per_entry * 2 - 64 * KiB
        vm.quit()


def test_in_use_bitmap_after_sigkill(tmp_path: Path) -> None:
    # Lazy refcounts make QEMU set the header's dirty bit too, so that is checked as well.
    path = create(tmp_path / "img.qcow2", 1 * GiB, "-o", "lazy_refcounts=on")
    qemu_img("bitmap", "--add", path, "stale")
    qemu_img("bitmap", "--add", "--disable", path, "off")
    with Qemu(path, tmp_path / "qemu1.log") as vm:
        vm.io("write -P 0x11 0 512")
        vm.quit(writes=1)
    assert Qcow2Image.open(path).bitmap("stale").dirty_ranges() == [(0, 64 * KiB)]

    with Qemu(path, tmp_path / "qemu2.log") as vm:
        vm.io("write -P 0x22 1M 512")
        assert vm.counts()["stale"] == 2 * 64 * KiB
        # Opening read-write already flagged every loaded bitmap in_use on disk.
        assert all(b.in_use for b in Qcow2Image.open(path).bitmaps)
        vm.sigkill()

    image = Qcow2Image.open(path)
    assert parsed_bitmaps(image) == info_bitmaps(path)
    assert {b.name: (b.in_use, b.auto) for b in image.bitmaps} == {
        "stale": (True, True),
        "off": (True, False),
    }
    stale = image.bitmap("stale")
    assert not stale.usable
    # Still readable, but it is the data of the last clean exit: the 1M write is missing.
    assert stale.dirty_ranges() == [(0, 64 * KiB)]
    # QEMU leaves autoclear bit 0 set: in_use alone marks the bitmaps as inconsistent.
    assert image.header.bitmaps_autoclear and image.bitmaps_consistent
    assert image.header.dirty is info(path)["dirty-flag"] is True


def test_cleared_autoclear_bit_makes_bitmaps_ignored(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", path, "b")
    with Qemu(path, tmp_path / "qemu.log") as vm:
        vm.io("write -P 0x11 1M 1")
        vm.quit(writes=1)
    # What a program that does not know bitmaps does when it writes the header.
    patch(path, 88, struct.pack(">Q", 0))
    image = Qcow2Image.open(path)
    assert image.bitmaps_extension is not None and not image.bitmaps_consistent
    bm = image.bitmap("b")
    assert not bm.in_use and not bm.usable
    assert bm.dirty_ranges() == [(1 * MiB, 64 * KiB)]
    assert info_bitmaps(path) == []  # QEMU ignores the extension


def test_empty_bitmap_added_offline(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 10 * GiB)
    qemu_img("bitmap", "--add", "-g", "4096", path, "empty")
    image = Qcow2Image.open(path)
    bm = image.bitmap("empty")
    assert parsed_bitmaps(image) == info_bitmaps(path) == [("empty", 4096, {"auto"})]
    assert bm.table_size == 10 * GiB // 4096 // 8 // (64 * KiB)
    assert all(e.raw == 0 for e in bm.table)
    assert bm.dirty_ranges() == [] and bm.dirty_granules() == [] and bm.dirty_bytes() == 0


def test_unknown_bitmap_name(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 1 * MiB)
    qemu_img("bitmap", "--add", path, "a")
    qemu_img("bitmap", "--add", path, "b")
    with pytest.raises(BitmapNotFoundError) as err:
        Qcow2Image.open(path).bitmap("c")
    assert isinstance(err.value, KeyError) and isinstance(err.value, HarnessError)
    assert str(err.value) == f"{path} has no bitmap named 'c' (bitmaps in it: 'a', 'b')"


def check_format_error(path: Path, *words: str) -> None:
    with pytest.raises(Qcow2FormatError) as err:
        Qcow2Image.open(path)
    message = str(err.value)
    assert isinstance(err.value, HarnessError)
    assert err.value.path == str(path)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message, message


def test_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    check_format_error(raw, "qcow2 magic")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    check_format_error(empty, "qcow2 magic")
    text = tmp_path / "qcow2.txt"
    text.write_text("QFI\xfb is not enough\n", encoding="latin-1")
    check_format_error(text, "header", "past the end")


def test_truncated_or_pointing_past_eof(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", path, "b")
    with Qemu(path, tmp_path / "qemu.log") as vm:
        vm.io("write -P 0x11 0 1")
        vm.quit(writes=1)
    image = Qcow2Image.open(path)
    ext, bm = image.bitmaps_extension, image.bitmap("b")
    assert ext is not None and bm.table[0].kind == "data"
    original = path.read_bytes()

    def variant(name: str) -> Path:
        copy = tmp_path / name
        copy.write_bytes(original)
        return copy

    # Truncated: inside the v3 header, then inside whichever bitmap structure comes last.
    structures = {
        "bitmap directory": ext.bitmap_directory_offset,
        "bitmap table": bm.table_offset,
        "data cluster 0": bm.table[0].offset,
    }
    last = max(structures, key=structures.__getitem__)
    for what, length in [("header", 90), (last, structures[last] + 1)]:
        cut = variant(f"cut-{length}.qcow2")
        os.truncate(cut, length)
        check_format_error(cut, what, "past the end")

    # Offsets past the end of the file, one structure at a time.
    far = struct.pack(">Q", 1 << 40)
    ext_at = original.index(struct.pack(">I", 0x23852875), 0, 4096)
    pointers = {
        "bitmap directory": ext_at + 8 + 16,  # bitmap_directory_offset in the extension
        "bitmap table": ext.bitmap_directory_offset,  # first field of the directory entry
        "data cluster 0": bm.table_offset,  # table entry 0
    }
    for what, field_at in pointers.items():
        moved = variant(f"moved-{field_at}.qcow2")
        patch(moved, field_at, far)
        check_format_error(moved, what, "past the end", str(1 << 40))

    # An offset with the all-ones bit, and a reserved bit (1) set: QEMU refuses both.
    for flag in (1, 2):
        bad = variant(f"bad-entry-{flag}.qcow2")
        patch(bad, bm.table_offset, struct.pack(">Q", bm.table[0].offset | flag))
        check_format_error(bad, "table entry 0 is invalid")


def test_sizes_are_checked_before_anything_is_allocated(tmp_path: Path) -> None:
    """Issue 9 item 6: the reader trusted sizes. A table_size of 0xFFFFFFFF in a large
    sparse file gave a MemoryError (or 47 s and 3.6 GB); a table larger than the geometry
    needs, granularity_bits 0 and absurd disk sizes were accepted. Each is refused at once,
    with the field named, and memory stays small."""
    import time
    import tracemalloc

    path = create(tmp_path / "img.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", path, "b")
    image = Qcow2Image.open(path)
    ext, bm = image.bitmaps_extension, image.bitmap("b")
    assert ext is not None and bm.table_size == 1
    original = path.read_bytes()
    ext_at = original.index(struct.pack(">I", 0x23852875), 0, 4096)
    entry = ext.bitmap_directory_offset

    def variant(name: str, at: int, data: bytes, grow: int = 0) -> Path:
        copy = tmp_path / name
        copy.write_bytes(original)
        patch(copy, at, data)
        if grow:
            os.truncate(copy, grow)  # sparse: a file big enough for any table
        return copy

    huge = variant("huge.qcow2", entry + 8, struct.pack(">I", 0xFFFFFFFF), grow=40 * GiB)
    tracemalloc.start()
    start = time.monotonic()
    check_format_error(huge, "bitmap 'b' has bitmap_table_size 4294967295")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.monotonic() - start < 1 and peak < 4 * MiB

    check_format_error(variant("two.qcow2", entry + 8, struct.pack(">I", 2), grow=1 * GiB),
                       "bitmap 'b' has bitmap_table_size 2, but a 67108864-byte disk at "
                       "granularity 65536 needs 1")
    check_format_error(variant("gran0.qcow2", entry + 17, b"\0"),
                       "bitmap 'b' has granularity_bits 0; QEMU writes only 9 to 31")
    check_format_error(variant("gran32.qcow2", entry + 17, b"\x20"), "granularity_bits 32")
    check_format_error(variant("disk.qcow2", 24, struct.pack(">Q", 1 << 62)),
                       "size (the disk size) is 4611686018427387904 bytes, more than its "
                       "l1_size of 1 entries maps")
    check_format_error(variant("dir.qcow2", ext_at + 8 + 8, struct.pack(">Q", 1 << 40),
                               grow=2 << 40),
                       f"bitmap_directory_size is {1 << 40} bytes")
