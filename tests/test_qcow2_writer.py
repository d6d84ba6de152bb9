"""The bitmap writer against qemu-img check and the independent reader.

The spec cases trust the writer twice: that a legal description gives a legal image
(refcounts right, so ``qemu-img check`` is clean and only the clause under test differs)
and that :class:`Written` says what the bytes say (the oracle's expectations come from it).
Both are checked here for every refcount width and two cluster sizes, for rewriting an
image's bitmaps, and for the knobs that make forbidden encodings.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.errors import Qcow2FormatError
from harness.qcow2 import Qcow2Image
from harness.qcow2_writer import (
    BitmapSpec,
    Qcow2WriteError,
    bitmap_bits,
    bits_to_ranges,
    write_bitmaps,
)
from tests.test_qcow2 import ENV, MiB, create, tool

B = BitmapSpec


def check(path: Path) -> dict[str, int]:
    proc = subprocess.run([tool("qemu-img"), "check", "--output=json", str(path)], env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"qemu-img check: {proc.stdout}{proc.stderr}"
    report: dict[str, int] = json.loads(proc.stdout)
    return report


@pytest.mark.parametrize("cluster", [512, 65536])
@pytest.mark.parametrize("refcount_bits", [1, 8, 16, 64])
def test_legal_images_pass_qemu_img_check(tmp_path: Path, cluster: int,
                                          refcount_bits: int) -> None:
    path = create(tmp_path / "img.qcow2", 8 * MiB, "-o",
                  f"cluster_size={cluster},refcount_bits={refcount_bits}")
    w = write_bitmaps(path, [
        B("data", 9, dirty=[(0, 0x1000), (0x7FF000, 0x1000)]),
        B("ones", 12, flags=0, entries=["ones"]),
        B("stale", 16, flags=3, dirty=[(0x10000, 1)], entries=["data"]),
    ])
    assert check(path).get("leaks", 0) == 0
    image = Qcow2Image.open(path)
    for b in w.bitmaps:
        got = image.bitmap(b.name)
        assert (got.flags, got.granularity_bits, got.table_size) == \
            (b.flags, b.granularity_bits, b.table_size)
        assert tuple(got.dirty_ranges()) == b.dirty
    assert image.bitmap("ones").dirty_ranges() == [(0, 8 * MiB)]


def test_rewriting_frees_the_old_bitmaps(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 4 * MiB)
    write_bitmaps(path, [B("a", dirty=[(0, 1)]), B("b", 9, dirty=[(MiB, 1)])])
    write_bitmaps(path, [B("c", dirty=[(2 * MiB, 1)])])
    report = check(path)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    assert [b.name for b in Qcow2Image.open(path).bitmaps] == ["c"]
    write_bitmaps(path, [])
    image = Qcow2Image.open(path)
    assert image.bitmaps_extension is None and not image.header.bitmaps_autoclear
    assert check(path).get("leaks", 0) == 0


def test_forbidden_knobs_reach_the_bytes(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 4 * MiB)
    write_bitmaps(path, [B("a")], ext_copies=2)
    with pytest.raises(Qcow2FormatError, match="repeated"):
        Qcow2Image.open(path)
    write_bitmaps(create(tmp_path / "img2.qcow2", 4 * MiB), [B("a"), B("a")])
    with pytest.raises(Qcow2FormatError, match="appears twice"):
        Qcow2Image.open(tmp_path / "img2.qcow2")
    w = write_bitmaps(create(tmp_path / "img3.qcow2", 4 * MiB), [B("a", type=2)])
    with pytest.raises(Qcow2FormatError, match="type 2"):
        Qcow2Image.open(w.path)


def test_bits_round_trip() -> None:
    size = 1000000
    for gbits, ranges in [(9, [(0, 1), (999999, 1)]), (16, [(0x10000, 0x20000)]),
                          (31, [(5, 5)])]:
        data = bitmap_bits(size, gbits, ranges)
        granules = -(-size // (1 << gbits))
        assert len(data) == (granules + 7) // 8
        gran = 1 << gbits
        want = [(o - o % gran, min(-(-(o + n) // gran) * gran, size) - (o - o % gran))
                for o, n in ranges]
        assert list(bits_to_ranges(data, gbits, size)) == want


def test_refuses_a_dirty_image(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 4 * MiB)
    with open(path, "r+b") as f:
        f.seek(79)
        f.write(b"\x01")  # incompatible bit 0: refcounts may be stale
    with pytest.raises(Qcow2WriteError, match="marked dirty"):
        write_bitmaps(path, [B("a")])
