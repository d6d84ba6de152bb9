"""Fuzz the qcow2 reader with Hypothesis, from images QEMU really wrote.

The oracle trusts ``harness.qcow2`` to read whatever a buggy QEMU leaves on disk, so the
reader must never crash, hang or allocate without bound on a damaged file: every input ends
in a result or a :class:`Qcow2FormatError` whose message names the field at fault, having
read and kept no more than a small multiple of the file (sizes are checked before
anything is allocated).

The images are made once per session: QEMU (qemu-img, and qemu-io through the block
layer, which records the writes in the bitmaps) makes one with two bitmaps; the writer
(``harness/qcow2_writer.py``) makes one with all-ones entries, an ``in_use`` bitmap and a
table over several 512-byte clusters. Each example damages a copy: bytes flipped in the
header, the extensions, the directory, a table or a data cluster; a size or offset field
inflated to an extreme; a table filled with one entry; the file cut short.

``make selftest`` runs a bounded, derandomized profile; a longer random run:
``pytest tests/test_qcow2_fuzz.py --hypothesis-profile=qiotests-fuzz-long --timeout 0``
(20000 examples per image: more than the default 300 s timeout).
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import Qcow2FormatError
from harness.qcow2 import EXT_BITMAPS, Qcow2Image, _Reader
from harness.qcow2_writer import BitmapSpec, write_bitmaps
from tests.test_qcow2 import MiB, create, qemu_img, tool

#: bounded and repeatable: what make selftest runs (the global profile stays untouched)
SELFTEST = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def chosen() -> settings:
    """The long profile when pytest was given it, else the bounded one."""
    current = settings.default
    if current is not None and current.max_examples >= 20000:
        return settings(current, suppress_health_check=list(HealthCheck))
    return SELFTEST

#: an error must name one of these (spec field names or the structure at fault)
FIELDS = (
    "magic", "version", "cluster_bits", "size", "l1_size", "header_length",
    "refcount_order", "header extension", "bitmaps extension", "nb_bitmaps",
    "bitmap_directory_size", "bitmap_directory_offset", "bitmap directory", "name_size",
    "extra_data_size", "granularity_bits", "bitmap_table_size", "bitmap_table_offset",
    "bitmap table", "table entry", "data cluster", "type", "flags", "name", "header",
)
EXTREMES = (0, 1, 7, 0x1FF, 0x200, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 62,
            (1 << 63) - 1, (1 << 64) - 1)


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    fmt: str


@dataclass(frozen=True)
class Sample:
    """An image's bytes, its regions and its fields (found by the reader beforehand)."""

    name: str
    data: bytes = field(repr=False)
    regions: tuple[tuple[str, int, int], ...]
    fields: tuple[Field, ...]
    #: (offset, entries, indexes of the entries that name a data cluster)
    tables: tuple[tuple[int, int, tuple[int, ...]], ...]


def sample(name: str, path: Path) -> Sample:
    data = path.read_bytes()
    image = Qcow2Image.open(path)
    h = image.header
    ext_at = data.index(struct.pack(">I", EXT_BITMAPS), 0, h.cluster_size) + 8
    ext = image.bitmaps_extension
    assert ext is not None
    regions = [("header", 0, h.header_length), ("extensions", h.header_length, 512),
               ("directory", ext.bitmap_directory_offset, ext.bitmap_directory_size)]
    fields = [Field(n, o, f) for n, o, f in (
        ("version", 4, ">I"), ("cluster_bits", 20, ">I"), ("size", 24, ">Q"),
        ("l1_size", 36, ">I"), ("header_length", 100, ">I"), ("refcount_order", 96, ">I"))]
    fields += [Field("extension length", ext_at - 4, ">I"),
               Field("nb_bitmaps", ext_at, ">I"), Field("reserved", ext_at + 4, ">I"),
               Field("bitmap_directory_size", ext_at + 8, ">Q"),
               Field("bitmap_directory_offset", ext_at + 16, ">Q")]
    pos = ext.bitmap_directory_offset
    tables = []
    for bm in image.bitmaps:
        fields += [Field(f"{bm.name}.{n}", pos + o, f) for n, o, f in (
            ("bitmap_table_offset", 0, ">Q"), ("bitmap_table_size", 8, ">I"),
            ("flags", 12, ">I"), ("type", 16, ">B"), ("granularity_bits", 17, ">B"),
            ("name_size", 18, ">H"), ("extra_data_size", 20, ">I"))]
        fields.append(Field(f"{bm.name} entry 0", bm.table_offset, ">Q"))
        regions.append((f"table {bm.name}", bm.table_offset, bm.table_size * 8))
        tables.append((bm.table_offset, bm.table_size,
                       tuple(i for i, e in enumerate(bm.table) if e.kind == "data") or (0,)))
        for e in bm.table:
            if e.kind == "data":
                regions.append((f"data {bm.name}", e.offset, h.cluster_size))
        pos += (24 + len(bm.extra_data) + len(bm.name.encode()) + 7) // 8 * 8
    return Sample(name, data, tuple(regions), tuple(fields), tuple(tables))


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    tool("qemu-img")
    tool("qemu-io")
    d = tmp_path_factory.mktemp("fuzz-images")
    made = create(d / "qemu.qcow2", 4 * MiB)
    qemu_img("bitmap", "--add", made, "b0")
    qemu_img("bitmap", "--add", "-g", "512", made, "fine")
    import subprocess
    subprocess.run([tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 0x10000",
                    "-c", "write -P 0x22 0x2ff000 0x3000", str(made)], check=True,
                   capture_output=True, timeout=60)
    crafted = create(d / "crafted.qcow2", 4 * MiB, "-o", "cluster_size=512")
    write_bitmaps(crafted, [
        BitmapSpec("ones", 9, dirty=[(0x201000, 0x800)], entries=["ones", "data"]),
        BitmapSpec("stale", 12, flags=3, dirty=[(0, 1)]),
        BitmapSpec("x" * 40, 16, flags=0, dirty=[(0x3f0000, 0x10000)])])
    # 64 GiB at granularity 512: 256 table entries of 64 KiB clusters in a small file
    wide = create(d / "wide.qcow2", 64 * 1024 * MiB)
    write_bitmaps(wide, [BitmapSpec("wide", 9, dirty=[(0, 0x1000), (0xFFFFF0000, 0x200)]),
                         BitmapSpec("narrow", 20, flags=0, dirty=[(1 << 35, 1)])])
    return [sample("qemu", made), sample("crafted", crafted), sample("wide", wide)]


Op = tuple[str, int, int]  # (what, offset, value): a byte xor, a field value, a cut


@st.composite
def damage(draw: st.DrawFn, s: Sample) -> list[Op]:
    """One to three ways to damage an image, as data (so a failure prints them, not the
    image): bytes flipped in a region, a field set to an extreme, a table filled with one
    of its entries, the file cut short."""
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "field", "repeat", "cut"]))
        if kind == "flip":
            what, start, length = draw(st.sampled_from(s.regions))
            at = start + draw(st.integers(0, max(0, length - 1)))
            ops.append((f"flip {what}", at, draw(st.integers(1, 255))))
        elif kind == "field":
            i = draw(st.integers(0, len(s.fields) - 1))
            width = struct.calcsize(s.fields[i].fmt)
            value = draw(st.sampled_from(EXTREMES) | st.integers(0, (1 << 8 * width) - 1))
            ops.append((f"field {s.fields[i].name}", i, value & ((1 << 8 * width) - 1)))
        elif kind == "repeat":
            t = draw(st.integers(0, len(s.tables) - 1))
            _, n, data_entries = s.tables[t]
            ops.append(("repeat", t, draw(st.sampled_from(data_entries) | st.integers(0, n - 1))))
        else:
            ops.append(("cut", draw(st.integers(0, len(s.data))), 0))
    return ops


def damaged(s: Sample, ops: list[Op]) -> bytes:
    data = bytearray(s.data)
    for what, at, value in ops:
        if what.startswith("flip") and at < len(data):
            data[at] ^= value
        elif what.startswith("field"):
            f = s.fields[at]
            width = struct.calcsize(f.fmt)
            data[f.offset:f.offset + width] = struct.pack(f.fmt, value)
        elif what == "repeat":
            off, n, _ = s.tables[at]
            data[off:off + 8 * n] = data[off + 8 * value:off + 8 * value + 8] * n
        elif what == "cut":
            del data[at:]
    return bytes(data)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes the reader reads, summed over one open."""
    total = [0]
    real = _Reader.read

    def read(self: _Reader, offset: int, length: int, what: str) -> bytes:
        data = real(self, offset, length, what)
        total[0] += len(data)
        return data

    monkeypatch.setattr(_Reader, "read", read)
    yield total


def check_one(path: Path, data: bytes, how: str, total: list[int]) -> None:
    path.write_bytes(data)
    total[0] = 0
    tracemalloc.start()
    try:
        image = Qcow2Image.open(path)
        for b in image.bitmaps:
            b.dirty_ranges()
            b.dirty_bytes()
    except Qcow2FormatError as e:
        message = str(e)
        assert any(word in message for word in FIELDS), f"{how}: error names no field: {e}"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # The reader reads each byte of the file at most a few times, and keeps no more.
    limit = 4 * len(data) + (1 << 16)
    assert total[0] <= limit, f"{how}: read {total[0]} bytes of a {len(data)}-byte file"
    assert peak <= limit + (4 << 20), f"{how}: peak memory {peak} bytes"


@pytest.mark.parametrize("which", ["qemu", "crafted", "wide"])
def test_damaged_images_end_in_a_result_or_a_named_error(
        which: str, samples: list[Sample], counted: list[int],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    s = next(x for x in samples if x.name == which)
    path = tmp_path_factory.mktemp("fuzz") / "damaged.qcow2"

    @chosen()
    @given(ops=damage(s))
    def run(ops: list[Op]) -> None:
        check_one(path, damaged(s, ops), repr(ops), counted)

    run()


def test_undamaged_samples_read_whole(samples: list[Sample], counted: list[int],
                                      tmp_path: Path) -> None:
    """The starting points are valid, so the fuzzing starts from real structure."""
    for s in samples:
        path = tmp_path / f"{s.name}.qcow2"
        path.write_bytes(s.data)
        image = Qcow2Image.open(path)
        assert len(image.bitmaps) >= 2 and any(b.dirty_ranges() for b in image.bitmaps)


def test_one_cluster_named_by_a_whole_table_is_refused(samples: list[Sample],
                                                       tmp_path: Path) -> None:
    """Found by this fuzzing: a table whose entries all name the same data cluster made
    the reader read (and keep) that cluster once per entry (16 MiB from a 640 KiB file
    here; gigabytes from a bigger one). A cluster used twice is now refused."""
    s = next(x for x in samples if x.name == "crafted")
    data = bytearray(s.data)
    image_path = tmp_path / "same.qcow2"
    image_path.write_bytes(s.data)
    ones = Qcow2Image.open(image_path).bitmap("ones")
    data_entry = next(e.raw for e in ones.table if e.kind == "data")
    off = ones.table_offset
    data[off:off + 8 * ones.table_size] = struct.pack(">Q", data_entry) * ones.table_size
    image_path.write_bytes(bytes(data))
    with pytest.raises(Qcow2FormatError, match="data cluster 1 of bitmap 'ones' and the "
                       "data cluster 0 of bitmap 'ones' share the cluster"):
        Qcow2Image.open(image_path)
