"""Write persistent dirty bitmaps into a qcow2 image, the way docs/interop/qcow2.txt allows
or deliberately the way it forbids.

The spec cases (``cases/test_qcow2_spec.py``) need images no QEMU writes: bitmaps with
all-ones table entries, extra data, names of 1023 bytes, granularities at the ends of the
range, a cleared autoclear bit, and every broken encoding a careless writer could leave.
The writer starts from an image QEMU made (``qemu-img create``), allocates clusters at the
end of the file for the bitmap data, the bitmap tables and the directory, counts every
cluster it allocates in the refcount blocks (and frees the clusters of the bitmaps it
replaces), and rewrites the header extensions. So an image it writes from a legal
description passes ``qemu-img check``; an illegal one is illegal only where the case says.

It encodes what it is told and checks nothing: a duplicate name, a type of 7, a table
entry with reserved bits are all written as given. What the bytes then *say* is returned
as :class:`Written`, computed from the encoding (an all-ones entry dirties its whole
cluster's range, whatever the requested ranges were), for the oracle to know every bit.
It is separate from :mod:`harness.qcow2` so the reader stays read-only and independent:
the reader is what checks the writer's output in the self-tests.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from harness.errors import HarnessError
from harness.qcow2 import (
    BME_FLAG_AUTO,
    BME_TABLE_ENTRY_ALL_ONES,
    EXT_BITMAPS,
    EXT_END,
    EntryFields,
    Qcow2Image,
)

EntryKind = Literal["auto", "zeroes", "ones", "data"]
Range = tuple[int, int]

#: where each field of a bitmap directory entry lies (offset in the entry, struct format)
ENTRY_FIELDS: dict[str, tuple[int, str]] = {
    "bitmap_table_offset": (0, ">Q"), "bitmap_table_size": (8, ">I"), "flags": (12, ">I"),
    "type": (16, ">B"), "granularity_bits": (17, ">B"), "name_size": (18, ">H"),
    "extra_data_size": (20, ">I"),
}
#: the fields of the bitmaps header extension's data
EXT_FIELDS: dict[str, tuple[int, str]] = {
    "nb_bitmaps": (0, ">I"), "reserved": (4, ">I"), "bitmap_directory_size": (8, ">Q"),
    "bitmap_directory_offset": (16, ">Q"),
}
#: the v3 header fields a case may patch
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
}
_ENTRY_HEAD = struct.Struct(">QIIBBHI")


class Qcow2WriteError(HarnessError):
    """The writer cannot encode what it was asked (the image lacks room, not qcow2 v3...)."""


@dataclass(frozen=True)
class BitmapSpec:
    """One bitmap to encode. Every field the spec constrains can be set to anything.

    ``dirty`` are guest byte ranges; their granules become set bits. ``entries`` chooses
    each bitmap table entry: ``"auto"`` (the default: all-zero clusters as a zero entry,
    the rest as data clusters), ``"zeroes"``, ``"ones"`` (an all-ones entry, no cluster),
    ``"data"`` (an allocated cluster even when its bits are all zero), or an int written
    verbatim as the raw entry (no cluster allocated or counted: for forbidden encodings).
    A shorter list is padded with ``"auto"``. ``table_size``, ``table_offset`` and
    ``name_size`` override what the directory entry claims (the table written is the
    real one). ``padding`` replaces the zero padding of the entry; ``tail_ones`` sets the
    unused bits after the last granule, which the spec requires to be zero.
    """

    name: str | bytes
    granularity_bits: int = 16
    flags: int = BME_FLAG_AUTO
    type: int = 1
    dirty: Sequence[Range] = ()
    extra_data: bytes = b""
    entries: Sequence[EntryKind | int] = ()
    table_size: int | None = None
    table_offset: int | None = None
    name_size: int | None = None
    padding: bytes | None = None
    tail_ones: bool = False

    @property
    def name_bytes(self) -> bytes:
        return self.name.encode() if isinstance(self.name, str) else self.name


@dataclass(frozen=True)
class WrittenBitmap(EntryFields):
    """One bitmap as the bytes now say: where its entry and table are, what is dirty."""

    name: str
    flags: int
    type: int
    granularity_bits: int
    entry_offset: int  # file offset of its directory entry
    table_offset: int
    table_size: int
    data_offsets: tuple[int, ...]  # allocated data clusters, in table order
    #: dirty guest ranges the encoding says (clipped to the disk); None when a raw entry
    #: makes the content undefined
    dirty: tuple[Range, ...] | None
    extra_data: bytes = b""


@dataclass(frozen=True)
class Written:
    """What :func:`write_bitmaps` put in the image, with where each field lies."""

    path: Path
    virtual_size: int
    cluster_size: int
    autoclear: bool  # bit 0 set in a v3 header: the extension is consistent
    ext_offset: int  # file offset of the bitmaps extension's data (after type and length)
    directory_offset: int
    directory_size: int
    bitmaps: tuple[WrittenBitmap, ...] = field(default=())

    def patch_entry(self, index: int, name: str, value: int) -> None:
        """Overwrite one field of directory entry ``index`` (refcounts untouched)."""
        off, fmt = ENTRY_FIELDS[name]
        poke(self.path, self.bitmaps[index].entry_offset + off, struct.pack(fmt, value))

    def patch_ext(self, name: str, value: int) -> None:
        """Overwrite one field of the bitmaps extension."""
        off, fmt = EXT_FIELDS[name]
        poke(self.path, self.ext_offset + off, struct.pack(fmt, value))


def poke(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the file, nothing else."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def patch_header(path: str | os.PathLike[str], name: str, value: int) -> None:
    """Overwrite one v3 header field (``autoclear_features``...)."""
    off, fmt = HEADER_FIELDS[name]
    poke(path, off, struct.pack(fmt, value))


def bitmap_bits(size: int, granularity_bits: int, dirty: Sequence[Range]) -> bytearray:
    """The bitmap data for a disk of ``size`` bytes: bit i (LSB first in byte i // 8) set
    when granule i meets a range of ``dirty``; exactly ceil(granules / 8) bytes."""
    gran = 1 << granularity_bits
    granules = -(-size // gran)
    data = bytearray(-(-granules // 8))
    for off, length in dirty:
        if length <= 0:
            continue
        first, end = off // gran, min(-(-(off + length) // gran), granules)
        for g in range(first, end):
            data[g >> 3] |= 1 << (g & 7)
    return data


def bits_to_ranges(data: bytes | bytearray, granularity_bits: int, size: int) -> tuple[Range, ...]:
    """Dirty guest ranges (clipped to ``size``) of bitmap data: the inverse of
    :func:`bitmap_bits`, with runs merged."""
    gran = 1 << granularity_bits
    granules = -(-size // gran)
    bits = int.from_bytes(data, "little") & ((1 << granules) - 1)
    out: list[Range] = []
    while bits:
        start = (bits & -bits).bit_length() - 1
        run = ((bits >> start) + 1) & ~(bits >> start)  # lowest clear bit above the run
        end = start + run.bit_length() - 1
        out.append((start * gran, min(end * gran, size) - start * gran))
        bits &= ~((1 << end) - 1)
    return tuple(out)


def write_bitmaps(path: str | os.PathLike[str], bitmaps: Sequence[BitmapSpec], *,
                  autoclear: bool = True, ext_length: int = 24, ext_first: bool = False,
                  ext_reserved: int = 0, nb_bitmaps: int | None = None,
                  ext_copies: int = 1) -> Written:
    """Replace the bitmaps of the qcow2 v3 image at ``path`` by ``bitmaps``.

    The clusters of the bitmaps already there are freed, new ones are allocated at the
    end of the file and counted; the directory follows the tables, cluster-aligned. The
    bitmaps extension is rewritten (placed first among the extensions with
    ``ext_first``), the header's autoclear bit 0 set or cleared as ``autoclear`` says.
    ``ext_length`` (24 is right), ``ext_reserved`` and ``nb_bitmaps`` override the
    extension's fields for forbidden encodings; the data written is always 24 bytes, a
    shorter length cuts it, a longer one pads it with zeroes; ``ext_copies`` writes the
    extension that many times (the spec allows one).
    """
    path = Path(path)
    image = Qcow2Image.open(path)
    header = image.header
    if header.version not in (2, 3):
        raise Qcow2WriteError(f"{path}: the writer needs a qcow2 v3 image "
                              f"(it has version {header.version})")
    if header.dirty:
        raise Qcow2WriteError(f"{path}: the image is marked dirty; refcounts may be stale")
    cs = header.cluster_size
    with open(path, "r+b") as f:
        rc = _Refcounts(f, image)
        _free_old(rc, image)
        written: list[WrittenBitmap] = []
        entries: list[bytes] = []
        for spec in bitmaps:
            wb, entry = _write_bitmap(f, rc, image, spec)
            written.append(wb)
            entries.append(entry)
        directory = b"".join(entries)
        dir_offset = rc.alloc(max(1, -(-len(directory) // cs))) if directory else 0
        if directory:
            _pwrite(f, dir_offset, directory)
        pos, offsets = dir_offset, []
        for entry in entries:
            offsets.append(pos)
            pos += len(entry)
        written = [_replace_entry_offset(w, o) for w, o in zip(written, offsets, strict=True)]
        nb = len(bitmaps) if nb_bitmaps is None else nb_bitmaps
        ext_offset = _write_extensions(f, image, bitmaps=bool(bitmaps) or nb_bitmaps is not None,
                                       data=struct.pack(">IIQQ", nb, ext_reserved,
                                                        len(directory), dir_offset),
                                       length=ext_length, first=ext_first,
                                       copies=ext_copies)
        flags = header.autoclear_features
        flags = flags | 1 if autoclear and (bitmaps or nb_bitmaps is not None) else flags & ~1
        if header.version == 3:  # v2 has no autoclear field: its bitmaps are never valid
            _pwrite(f, 88, struct.pack(">Q", flags))
        rc.flush()
    consistent = header.version == 3 and bool(flags & 1)
    return Written(path, header.virtual_size, cs, consistent, ext_offset, dir_offset,
                   len(directory), tuple(written))


def _replace_entry_offset(w: WrittenBitmap, offset: int) -> WrittenBitmap:
    return WrittenBitmap(w.name, w.flags, w.type, w.granularity_bits, offset, w.table_offset,
                         w.table_size, w.data_offsets, w.dirty, w.extra_data)


def _pwrite(f: BinaryIO, offset: int, data: bytes) -> None:
    f.seek(offset)
    f.write(data)


def _write_bitmap(f: BinaryIO, rc: _Refcounts, image: Qcow2Image,
                  spec: BitmapSpec) -> tuple[WrittenBitmap, bytes]:
    """Data clusters and table of one bitmap; returns it and its directory entry."""
    cs = image.header.cluster_size
    size = image.header.virtual_size
    gbits = spec.granularity_bits
    # A granularity outside what a 64-bit size can use still gets a table: one cluster.
    data = bitmap_bits(size, gbits, spec.dirty) if gbits < 64 else bytearray(1)
    n_clusters = max(1, -(-len(data) // cs))
    kinds = list(spec.entries) + ["auto"] * (n_clusters - len(spec.entries))
    table: list[int] = []
    data_offsets: list[int] = []
    said = bytearray(data)  # what the bytes will say, cluster by cluster
    defined = True
    for i, kind in enumerate(kinds):
        chunk = bytes(data[i * cs:(i + 1) * cs])
        if isinstance(kind, int):
            table.append(kind)
            defined = False
            continue
        if kind == "auto":
            kind = "data" if any(chunk) else "zeroes"
        if kind == "zeroes":
            table.append(0)
            said[i * cs:i * cs + len(chunk)] = bytes(len(chunk))
        elif kind == "ones":
            table.append(BME_TABLE_ENTRY_ALL_ONES)
            said[i * cs:i * cs + len(chunk)] = b"\xff" * len(chunk)
        else:
            off = rc.alloc(1)
            cluster = bytearray(chunk.ljust(cs, b"\0"))
            if spec.tail_ones and i == n_clusters - 1:
                _set_tail(cluster, size, gbits, i * cs)
            _pwrite(f, off, bytes(cluster))
            table.append(off)
            data_offsets.append(off)
    raw_table = b"".join(struct.pack(">Q", e) for e in table)
    table_offset = rc.alloc(-(-len(raw_table) // cs))
    _pwrite(f, table_offset, raw_table.ljust(-(-len(raw_table) // cs) * cs, b"\0"))
    name = spec.name_bytes
    entry = _ENTRY_HEAD.pack(
        table_offset if spec.table_offset is None else spec.table_offset,
        len(table) if spec.table_size is None else spec.table_size,
        spec.flags, spec.type, gbits,
        len(name) if spec.name_size is None else spec.name_size,
        len(spec.extra_data)) + spec.extra_data + name
    pad = -len(entry) % 8
    entry += (bytes(pad) if spec.padding is None else spec.padding[:pad].ljust(pad, b"\0"))
    dirty = bits_to_ranges(said, gbits, size) if defined and gbits < 64 else None
    wb = WrittenBitmap(name.decode("utf-8", "replace"), spec.flags, spec.type, gbits, 0,
                       table_offset, len(table), tuple(data_offsets), dirty, spec.extra_data)
    return wb, entry


def _set_tail(cluster: bytearray, size: int, gbits: int, base: int) -> None:
    """Set every bit of ``cluster`` (bitmap bytes from ``base``) past the last granule."""
    granules = -(-size // (1 << gbits))
    for bit in range(len(cluster) * 8):
        if (base * 8 + bit) >= granules:
            cluster[bit >> 3] |= 1 << (bit & 7)


def _free_old(rc: _Refcounts, image: Qcow2Image) -> None:
    """Drop the clusters of the bitmaps the image has now (their refcounts go down)."""
    ext = image.bitmaps_extension
    if ext is None:
        return
    cs = image.header.cluster_size
    rc.free(ext.bitmap_directory_offset, ext.bitmap_directory_size)
    for bm in image.bitmaps:
        rc.free(bm.table_offset, bm.table_size * 8)
        for entry in bm.table:
            if entry.kind == "data":
                rc.free(entry.offset, cs)


def _write_extensions(f: BinaryIO, image: Qcow2Image, bitmaps: bool, data: bytes,
                      length: int, first: bool, copies: int = 1) -> int:
    """Rewrite the extension area: the others as they were, the bitmaps one (if any)
    last (or first), the end marker; returns the file offset of the bitmaps data."""
    header = image.header
    others = [e for e in image.extensions if e.type != EXT_BITMAPS]
    end = header.extensions_end
    old_len = sum(e.area_size for e in image.extensions) + 8  # and the end marker
    parts: list[tuple[int, bytes]] = [(e.type, e.data) for e in others]
    payload = data[:length].ljust(length, b"\0")
    if bitmaps:
        for _ in range(copies):
            parts.insert(0 if first else len(parts), (EXT_BITMAPS, payload))
    out = bytearray()
    ext_offset = 0
    for ext_type, body in parts:
        if ext_type == EXT_BITMAPS and ext_offset == 0:
            ext_offset = header.header_length + len(out) + 8
        out += struct.pack(">II", ext_type, len(body)) + body + bytes(-len(body) % 8)
    out += struct.pack(">II", EXT_END, 0)
    if header.header_length + len(out) > end:
        raise Qcow2WriteError(f"{image.path}: the header extensions ({len(out)} bytes) do "
                              f"not fit before offset {end}")
    out = out.ljust(max(len(out), old_len), b"\0")[: end - header.header_length]
    _pwrite(f, header.header_length, bytes(out))
    return ext_offset


class _Refcounts:
    """The image's refcount structure, changed cluster by cluster, written at flush().

    Allocation appends at the end of the file (cluster-aligned); a missing refcount block
    is allocated there too and counts itself. The refcount table is never grown: an image
    whose table cannot cover the new end raises :class:`Qcow2WriteError`.
    """

    def __init__(self, f: BinaryIO, image: Qcow2Image) -> None:
        h = image.header
        self.f = f
        self.path = image.path
        self.cs = h.cluster_size
        self.bits = 1 << h.refcount_order
        self.per_block = self.cs * 8 // self.bits
        f.seek(h.refcount_table_offset)
        raw = f.read(h.refcount_table_clusters * self.cs)
        self.table = [e for (e,) in struct.iter_unpack(">Q", raw)]
        self.table_offset = h.refcount_table_offset
        self.blocks: dict[int, bytearray] = {}
        self.end = -(-image.file_size // self.cs) * self.cs

    def _block(self, index: int) -> bytearray:
        if index >= len(self.table):
            raise Qcow2WriteError(
                f"{self.path}: the refcount table ({len(self.table)} entries) cannot cover "
                f"offset {index * self.per_block * self.cs}; use a larger cluster size")
        if index not in self.blocks:
            off = self.table[index] & ~0x1FF
            if off:
                self.f.seek(off)
                self.blocks[index] = bytearray(self.f.read(self.cs).ljust(self.cs, b"\0"))
            else:
                self.blocks[index] = bytearray(self.cs)
                new = self.end
                self.end += self.cs
                self.table[index] = new
                self.change(new, self.cs, 1)
        return self.blocks[index]

    def get(self, cluster: int) -> int:
        block = self._block(cluster // self.per_block)
        i = cluster % self.per_block
        if self.bits >= 8:
            n = self.bits // 8
            return int.from_bytes(block[i * n:(i + 1) * n], "big")
        shift = i * self.bits % 8
        return block[i * self.bits // 8] >> shift & ((1 << self.bits) - 1)

    def _set(self, cluster: int, value: int) -> None:
        if not 0 <= value < 1 << self.bits:
            raise Qcow2WriteError(f"{self.path}: refcount {value} of cluster {cluster} does "
                                  f"not fit in {self.bits} bits")
        block = self._block(cluster // self.per_block)
        i = cluster % self.per_block
        if self.bits >= 8:
            n = self.bits // 8
            block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
        else:
            pos, shift = i * self.bits // 8, i * self.bits % 8
            mask = ((1 << self.bits) - 1) << shift
            block[pos] = (block[pos] & ~mask) | (value << shift)

    def change(self, offset: int, length: int, delta: int) -> None:
        for cluster in range(offset // self.cs, -(-(offset + length) // self.cs)):
            self._set(cluster, self.get(cluster) + delta)

    def free(self, offset: int, length: int) -> None:
        if offset and length:
            self.change(offset, length, -1)

    def alloc(self, clusters: int) -> int:
        off = self.end
        self.end += clusters * self.cs
        self.change(off, clusters * self.cs, 1)
        return off

    def flush(self) -> None:
        for index, block in self.blocks.items():
            _pwrite(self.f, self.table[index] & ~0x1FF, bytes(block))
        raw = b"".join(struct.pack(">Q", e) for e in self.table)
        _pwrite(self.f, self.table_offset, raw)
        # Allocated clusters past the last write still belong to the file.
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() < self.end:
            self.f.truncate(self.end)
