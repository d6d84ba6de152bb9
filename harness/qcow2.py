"""Read a qcow2 image's header and persistent dirty bitmaps without QEMU.

Cases check what QEMU left on disk (which bitmaps, which flags, which guest bytes are
dirty) after QEMU has exited, so the answer must not come from QEMU itself: a bug that
makes QEMU write a wrong bitmap would also make it read the wrong bitmap back. This module
is an independent reader written from docs/interop/qcow2.txt. It is read-only and loads all
the metadata it needs in :meth:`Qcow2Image.open`, which suits the small test images cases
make; afterwards nothing touches the file again.

Everything returned is a frozen dataclass or a tuple, so a result can be kept and compared
after the image has changed. Structural problems (not qcow2, truncated, an offset past the
end of the file, reserved bits set) raise :class:`Qcow2FormatError`; a bitmap whose *content*
cannot be trusted (``in_use``) is still returned, see :attr:`Bitmap.usable`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from harness.errors import HarnessError, Qcow2FormatError

QCOW2_MAGIC = b"QFI\xfb"

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_EXT_NAMES = {
    EXT_BACKING_FORMAT: "backing-format",
    EXT_FEATURE_TABLE: "feature-table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO: "crypto",
    EXT_DATA_FILE: "data-file",
}

# Header fields up to snapshots_offset (v2, 72 bytes), then the v3 additions (104 bytes).
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT_HEADER = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_DIR_ENTRY = struct.Struct(">QIIBBHI")

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF00_0000_0000_01FE
BME_TABLE_ENTRY_ALL_ONES = 1 << 0

# QEMU's own limits (block/qcow2-bitmap.c, block/qcow2.h); QEMU never writes beyond them,
# so a reader checking QEMU's output can refuse anything past them before allocating.
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_TABLE_SIZE = 0x8000000  # entries
BME_MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

# Bytes of bitmap data scanned at once for dirty runs: big enough that a clean stretch
# costs one comparison, small enough that the big-int shifts per run stay cheap.
_SCAN_CHUNK = 512


@dataclass(frozen=True)
class Qcow2Header:
    """The fixed qcow2 header; v2 images get the defaults the spec implies for v3 fields."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = _HEADER_V2.size

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extensions_end(self) -> int:
        """Where the header extension area ends: at the first cluster's end, or where the
        backing file name starts when it starts inside that cluster."""
        if 0 < self.backing_file_offset < self.cluster_size:
            return self.backing_file_offset
        return self.cluster_size

    @property
    def dirty(self) -> bool:
        """Incompatible bit 0: refcounts may be stale (lazy refcounts, unclean exit)."""
        return bool(self.incompatible_features & 1)

    @property
    def corrupt(self) -> bool:
        """Incompatible bit 1: QEMU found corruption and refuses to write the image."""
        return bool(self.incompatible_features & 2)

    @property
    def bitmaps_autoclear(self) -> bool:
        """Autoclear bit 0: the last writer understood bitmaps, so the extension is valid.

        A program that does not know bitmaps clears this bit when it writes the image;
        QEMU then treats every stored bitmap as inconsistent and ignores the extension.
        """
        return bool(self.autoclear_features & 1)


@dataclass(frozen=True)
class HeaderExtension:
    """One header extension, raw; ``data`` excludes the padding to a multiple of 8."""

    type: int
    length: int
    data: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return _EXT_NAMES.get(self.type, f"unknown-{self.type:#010x}")

    @property
    def area_size(self) -> int:
        """The bytes it takes in the extension area: type, length, data padded to 8."""
        return _EXT_HEADER.size + ((self.length + 7) & ~7)


@dataclass(frozen=True)
class BitmapsExtension:
    """The decoded bitmaps extension (type 0x23852875)."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@dataclass(frozen=True)
class BitmapTableEntry:
    """One bitmap table entry: where one cluster's worth of bitmap data lives."""

    raw: int

    @property
    def offset(self) -> int:
        return self.raw & BME_TABLE_ENTRY_OFFSET_MASK

    @property
    def kind(self) -> Literal["zeroes", "ones", "data"]:
        """Whether a cluster is allocated ("data") or bit 0 says all "ones" or all "zeroes"."""
        if self.offset:
            return "data"
        return "ones" if self.raw & BME_TABLE_ENTRY_ALL_ONES else "zeroes"


class EntryFields:
    """What a bitmap directory entry's flags and granularity say; the reader's
    :class:`Bitmap` and the writer's ``WrittenBitmap`` both have them."""

    flags: int
    granularity_bits: int

    @property
    def in_use(self) -> bool:
        """Flag bit 0: QEMU had the bitmap loaded and never stored it back; data is stale."""
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        """Flag bit 1: the bitmap is enabled (records writes); QMP calls this recording."""
        return bool(self.flags & BME_FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


@dataclass(frozen=True)
class Bitmap(EntryFields):
    """One persistent dirty bitmap, its directory entry plus the data it points to.

    The data is decoded even when :attr:`in_use` is set, because cases want to look at
    what a crashed QEMU left behind; but such data is whatever was last stored before the
    bitmap was loaded for writing, not the current dirty state. Check :attr:`usable`
    before treating :meth:`dirty_ranges` as the truth.
    """

    name: str
    flags: int
    type: int
    granularity_bits: int
    table_offset: int
    table_size: int
    extra_data: bytes
    virtual_size: int
    cluster_size: int
    extension_consistent: bool
    table: tuple[BitmapTableEntry, ...] = field(repr=False)
    # Data of each "data" table entry (None elsewhere), cut to the bytes that hold bits.
    clusters: tuple[bytes | None, ...] = field(repr=False)

    @property
    def extra_data_compatible(self) -> bool:
        return bool(self.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)

    @property
    def usable(self) -> bool:
        """Whether the spec lets a reader trust this bitmap's data (QEMU: load it)."""
        return (
            self.extension_consistent
            and not self.in_use
            and (not self.extra_data or self.extra_data_compatible)
        )

    @property
    def nb_granules(self) -> int:
        """How many bits the bitmap has: the last granule may reach past the disk end."""
        return _div_up(self.virtual_size, self.granularity)

    def dirty_granules(self) -> list[tuple[int, int]]:
        """Runs of set bits as ``(first_bit, count)``, sorted and merged, in bitmap bits."""
        bits_per_cluster = self.cluster_size * 8
        limit = self.nb_granules
        runs: list[tuple[int, int]] = []

        def add(start: int, end: int) -> None:
            end = min(end, limit)
            if start >= end:
                return
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((start, end - start))

        for index, (entry, data) in enumerate(zip(self.table, self.clusters, strict=True)):
            base = index * bits_per_cluster
            if entry.kind == "ones":
                add(base, base + bits_per_cluster)
            elif data is not None:
                for start, end in _set_bit_runs(data):
                    add(base + start, base + end)
        return runs

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """Dirty guest bytes as sorted, merged ``(offset, length)``, clipped to the disk size.

        Bit i covers guest bytes ``[i * granularity, (i + 1) * granularity)``. Meaningless
        when :attr:`usable` is False (see the class docstring), but still computed.
        """
        g = self.granularity
        return [
            (first * g, min((first + count) * g, self.virtual_size) - first * g)
            for first, count in self.dirty_granules()
        ]

    def dirty_bytes(self) -> int:
        """Dirty granules times granularity: the ``count`` QMP reports for the bitmap.

        QEMU does not clip the last granule at the end of the disk, so this can exceed
        the sum of :meth:`dirty_ranges` lengths when the size is not granule-aligned.
        """
        return sum(count for _, count in self.dirty_granules()) * self.granularity


class BitmapNotFoundError(HarnessError, KeyError):
    """:meth:`Qcow2Image.bitmap` was asked for a name the image does not have."""

    def __str__(self) -> str:
        # KeyError would show the message repr()-quoted; this one is meant to be read.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Qcow2Image:
    """The metadata of one qcow2 file, as read by :meth:`open`."""

    path: str
    file_size: int
    header: Qcow2Header
    extensions: tuple[HeaderExtension, ...]
    bitmaps_extension: BitmapsExtension | None
    bitmaps: tuple[Bitmap, ...]

    @property
    def bitmaps_consistent(self) -> bool:
        """True if the bitmaps extension exists and autoclear bit 0 vouches for it.

        When the extension exists but the bit is clear, QEMU ignores (and, opening the
        image read-write, drops) every bitmap; :attr:`bitmaps` still lists them here.
        """
        return self.bitmaps_extension is not None and self.header.bitmaps_autoclear

    def bitmap(self, name: str) -> Bitmap:
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        have = ", ".join(repr(b.name) for b in self.bitmaps) or "none"
        raise BitmapNotFoundError(
            f"{self.path} has no bitmap named {name!r} (bitmaps in it: {have})"
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Qcow2Image:
        """Read and check the header, extensions, bitmap directory and bitmap data.

        Raises :class:`Qcow2FormatError` for a file that is not well-formed qcow2; errors
        opening or reading the file itself (missing, unreadable) propagate as ``OSError``.
        """
        with open(path, "rb") as f:
            return _Reader(os.fspath(path), f).image()


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _set_bit_runs(data: bytes) -> list[tuple[int, int]]:
    """``[start, end)`` runs of set bits; bit i is bit ``i % 8`` (LSB first) of byte ``i // 8``.

    That byte/bit order is the spec's ``bit_offset()`` formula, so reading the bytes as
    one little-endian integer makes bit i of the bitmap bit i of the integer.
    """
    runs: list[tuple[int, int]] = []
    zero = bytes(_SCAN_CHUNK)
    for pos in range(0, len(data), _SCAN_CHUNK):
        chunk = data[pos : pos + _SCAN_CHUNK]
        if chunk == zero[: len(chunk)]:
            continue
        base = pos * 8
        x = int.from_bytes(chunk, "little")
        while x:
            start = (x & -x).bit_length() - 1
            shifted = x >> start
            length = (~shifted & (shifted + 1)).bit_length() - 1
            if runs and runs[-1][1] == base + start:
                runs[-1] = (runs[-1][0], base + start + length)
            else:
                runs.append((base + start, base + start + length))
            x = shifted >> length << (start + length)
    return runs


class _Reader:
    """Parses one open file; every read is bounds-checked so errors name what is missing."""

    def __init__(self, path: str, f: BinaryIO) -> None:
        self.path = path
        self.f = f
        self.size = os.fstat(f.fileno()).st_size
        #: cluster index -> the bitmap structure using it. Each cluster may be used once:
        #: a table or data cluster named twice would be read (and kept) twice, and N
        #: entries naming one cluster would cost N clusters of memory from a file of one.
        self.owner: dict[int, str] = {}

    def fail(self, message: str) -> Qcow2FormatError:
        return Qcow2FormatError(self.path, message)

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self.size:
            raise self.fail(
                f"the {what} ({length} bytes at offset {offset}) lies past the end of the "
                f"file, which is {self.size} bytes long"
            )
        self.f.seek(offset)
        data = self.f.read(length)
        if len(data) != length:
            raise self.fail(f"reading the {what} at offset {offset} returned too few bytes")
        return data

    def claim(self, offset: int, length: int, what: str, cluster_size: int) -> None:
        """Mark the clusters of a structure just read as used by ``what``."""
        for c in range(offset // cluster_size, -(-(offset + length) // cluster_size)):
            other = self.owner.setdefault(c, what)
            if other != what:
                raise self.fail(f"the {what} and the {other} share the cluster at offset "
                                f"{c * cluster_size}")

    def image(self) -> Qcow2Image:
        header = self.header()
        extensions = self.extensions(header)
        ext = self.bitmaps_extension(header, extensions)
        bitmaps: tuple[Bitmap, ...] = ()
        if ext is not None:
            bitmaps = self.bitmap_directory(header, ext)
        return Qcow2Image(self.path, self.size, header, extensions, ext, bitmaps)

    def header(self) -> Qcow2Header:
        if self.size < 4 or self.read(0, 4, "magic") != QCOW2_MAGIC:
            raise self.fail("the file does not start with the qcow2 magic 'QFI\\xfb'")
        fields = _HEADER_V2.unpack(self.read(0, _HEADER_V2.size, "header"))
        version, cluster_bits = fields[1], fields[4]
        if version not in (2, 3):
            raise self.fail(f"the qcow2 version is {version}, only 2 and 3 exist")
        if not 9 <= cluster_bits <= 30:
            raise self.fail(f"cluster_bits is {cluster_bits}, outside the range 9 to 30")
        size, l1_size = fields[5], fields[7]
        per_l1_entry = (1 << cluster_bits) // 8 * (1 << cluster_bits)
        if size >= 1 << 63 or size > l1_size * per_l1_entry:
            raise self.fail(
                f"size (the disk size) is {size} bytes, more than its l1_size of {l1_size} "
                f"entries maps ({l1_size * per_l1_entry} bytes)")
        if version == 2:
            return Qcow2Header(version, *fields[2:])
        v3 = _HEADER_V3.unpack(self.read(_HEADER_V2.size, _HEADER_V3.size, "v3 header"))
        header = Qcow2Header(version, *fields[2:], *v3)
        if header.refcount_order > 6:
            raise self.fail(f"refcount_order is {header.refcount_order}, more than 6")
        length = header.header_length
        if length < _HEADER_V2.size + _HEADER_V3.size or length % 8 or length > (1 << cluster_bits):
            raise self.fail(f"header_length is {length}, not a multiple of 8 from 104 to a cluster")
        return header

    def extensions(self, header: Qcow2Header) -> tuple[HeaderExtension, ...]:
        end = header.extensions_end
        offset = header.header_length
        found: list[HeaderExtension] = []
        while offset + _EXT_HEADER.size <= end:
            ext_type, length = _EXT_HEADER.unpack(
                self.read(offset, _EXT_HEADER.size, "header extension header")
            )
            if ext_type == EXT_END:
                break
            offset += _EXT_HEADER.size
            if offset + length > end:
                raise self.fail(
                    f"header extension {ext_type:#010x} at offset {offset - 8} is {length} "
                    f"bytes long and overruns the header area ending at offset {end}"
                )
            what = f"header extension {ext_type:#010x}"
            found.append(HeaderExtension(ext_type, length, self.read(offset, length, what)))
            offset += found[-1].area_size - _EXT_HEADER.size
        return tuple(found)

    def bitmaps_extension(self, header: Qcow2Header,
                          extensions: tuple[HeaderExtension, ...]) -> BitmapsExtension | None:
        exts = [e for e in extensions if e.type == EXT_BITMAPS]
        if not exts:
            return None
        if len(exts) > 1 or exts[0].length != _BITMAPS_EXT.size:
            raise self.fail("the bitmaps header extension is repeated or not 24 bytes long")
        nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(exts[0].data)
        if nb > QCOW2_MAX_BITMAPS:
            raise self.fail(f"nb_bitmaps is {nb}, over QEMU's limit of {QCOW2_MAX_BITMAPS}")
        if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or dir_size < nb * _DIR_ENTRY.size:
            raise self.fail(
                f"bitmap_directory_size is {dir_size} bytes: {nb} bitmaps need "
                f"{nb * _DIR_ENTRY.size} at least and QEMU writes "
                f"{QCOW2_MAX_BITMAP_DIRECTORY_SIZE} at most")
        if nb == 0:
            raise self.fail("nb_bitmaps is 0; a bitmaps extension holds at least one bitmap")
        if reserved:
            raise self.fail(f"the bitmaps extension's reserved field is {reserved:#x}, not 0")
        if dir_offset == 0 or dir_offset % header.cluster_size:
            raise self.fail(f"bitmap_directory_offset is {dir_offset}, not a non-zero "
                            f"multiple of the cluster size {header.cluster_size}")
        return BitmapsExtension(nb, dir_size, dir_offset)

    def bitmap_directory(self, header: Qcow2Header, ext: BitmapsExtension) -> tuple[Bitmap, ...]:
        directory = self.read(
            ext.bitmap_directory_offset, ext.bitmap_directory_size, "bitmap directory"
        )
        self.claim(ext.bitmap_directory_offset, len(directory), "bitmap directory",
                   header.cluster_size)
        bitmaps: list[Bitmap] = []
        pos = 0
        while pos < len(directory):
            if len(bitmaps) == ext.nb_bitmaps:
                raise self.fail(
                    f"the bitmaps extension says nb_bitmaps {ext.nb_bitmaps} but the "
                    f"directory (bitmap_directory_size {len(directory)}) holds more entries")
            if pos + _DIR_ENTRY.size > len(directory):
                raise self.fail(f"bitmap_directory_size {len(directory)} cuts bitmap "
                                f"directory entry {len(bitmaps)} short")
            t_off, t_size, flags, bm_type, gran_bits, name_size, extra_size = (
                _DIR_ENTRY.unpack_from(directory, pos)
            )
            body = pos + _DIR_ENTRY.size
            entry_end = body + extra_size + name_size
            if name_size == 0:
                raise self.fail(f"bitmap directory entry {len(bitmaps)} has name_size 0")
            if entry_end > len(directory):
                raise self.fail(
                    f"bitmap directory entry {len(bitmaps)} (extra_data_size {extra_size}, "
                    f"name_size {name_size}) overruns bitmap_directory_size {len(directory)}")
            extra = directory[body : body + extra_size]
            name = directory[body + extra_size : entry_end].decode("utf-8", "replace")
            if any(b.name == name for b in bitmaps):
                raise self.fail(f"the bitmap name {name!r} appears twice in the directory")
            if bm_type != 1:
                raise self.fail(f"bitmap {name!r} has type {bm_type}; only 1 (dirty "
                                "tracking) exists")
            if flags & ~0x7:
                raise self.fail(f"bitmap {name!r} has reserved flags set (flags {flags:#x})")
            if not BME_MIN_GRANULARITY_BITS <= gran_bits <= BME_MAX_GRANULARITY_BITS:
                raise self.fail(
                    f"bitmap {name!r} has granularity_bits {gran_bits}; QEMU writes only "
                    f"{BME_MIN_GRANULARITY_BITS} to {BME_MAX_GRANULARITY_BITS}")
            self.check_table_size(header, name, t_size, gran_bits, flags)
            data = self.bitmap_table(header, name, t_off, t_size, gran_bits)
            geometry = (header.virtual_size, header.cluster_size, header.bitmaps_autoclear)
            bitmaps.append(
                Bitmap(name, flags, bm_type, gran_bits, t_off, t_size, extra, *geometry, *data)
            )
            pos = (entry_end + 7) & ~7
        if len(bitmaps) != ext.nb_bitmaps:
            raise self.fail(
                f"the bitmaps extension says nb_bitmaps {ext.nb_bitmaps} but the directory "
                f"holds {len(bitmaps)}"
            )
        return tuple(bitmaps)

    def check_table_size(self, header: Qcow2Header, name: str, size: int, gran_bits: int,
                         flags: int) -> None:
        """``bitmap_table_size`` against the geometry, before anything is allocated.

        A consistent bitmap needs exactly one entry per cluster of bitmap data for the disk
        size at its granularity. An ``in_use`` one may have a stale size (QEMU's own check
        allows it after a resize), but never more than QEMU's limits.
        """
        cs = header.cluster_size
        needed = _div_up(_div_up(_div_up(header.virtual_size, 1 << gran_bits), 8), cs)
        if size == 0 or size > BME_MAX_TABLE_SIZE or size * cs > BME_MAX_PHYS_SIZE:
            raise self.fail(
                f"bitmap {name!r} has bitmap_table_size {size}; QEMU writes 1 to "
                f"{min(BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE // cs)} entries with "
                f"{cs}-byte clusters (this disk needs {needed})")
        if size != needed and not flags & BME_FLAG_IN_USE:
            raise self.fail(
                f"bitmap {name!r} has bitmap_table_size {size}, but a {header.virtual_size}"
                f"-byte disk at granularity {1 << gran_bits} needs {needed}")
        if size * 8 > self.size:
            raise self.fail(
                f"bitmap {name!r} has bitmap_table_size {size} ({size * 8} bytes), more "
                f"than the whole file ({self.size} bytes)")

    def bitmap_table(
        self, header: Qcow2Header, name: str, offset: int, size: int, gran_bits: int
    ) -> tuple[tuple[BitmapTableEntry, ...], tuple[bytes | None, ...]]:
        cs = header.cluster_size
        if offset == 0 or offset % cs:
            raise self.fail(f"bitmap {name!r} has bitmap_table_offset {offset}, not a "
                            f"non-zero multiple of the cluster size {cs}")
        raw = self.read(offset, size * 8, f"bitmap table of {name!r}")
        self.claim(offset, len(raw), f"bitmap table of {name!r}", cs)
        table = tuple(BitmapTableEntry(e) for (e,) in struct.iter_unpack(">Q", raw))
        # Bytes of bitmap data in all: only these are read from the last data cluster.
        data_bytes = _div_up(_div_up(header.virtual_size, 1 << gran_bits), 8)
        clusters: list[bytes | None] = []
        for index, entry in enumerate(table):
            bad = (
                entry.raw & BME_TABLE_ENTRY_RESERVED_MASK
                or entry.offset % cs
                or (entry.offset and entry.raw & BME_TABLE_ENTRY_ALL_ONES)
            )
            if bad:
                raise self.fail(
                    f"bitmap {name!r} table entry {index} is invalid ({entry.raw:#018x}: "
                    "reserved bits, an offset not cluster-aligned, or bit 0 with an offset)"
                )
            if entry.kind != "data":
                clusters.append(None)
                continue
            length = max(0, min(cs, data_bytes - index * cs))
            what = f"data cluster {index} of bitmap {name!r}"
            clusters.append(self.read(entry.offset, length, what))
            self.claim(entry.offset, max(length, 1), what, cs)
        return table, tuple(clusters)
