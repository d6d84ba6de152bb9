"""The dirty-bitmap part of a saved migration stream, found and laid out for editing.

A migration to a file (``migrate`` to ``exec:cat > PATH``) saves the stream QEMU would
send a destination; a case edits its bitmap chunks and feeds the result to a destination
(``migrate-incoming`` from ``exec:cat PATH``) to see what QEMU's reader
(``migration/block-dirty-bitmap.c``, ``dirty_bitmap_load``) makes of input no QEMU sends.
The layout, as QEMU writes it:

* the section header: ``QEMU_VM_SECTION_START`` (1), the section id (be32), the idstr
  ``dirty-bitmap`` as a counted string, the instance id (be32, 0), the version id (be32,
  1); the ``save_setup`` chunks follow; later ``QEMU_VM_SECTION_PART`` (2) or ``_END`` (3)
  with the section id and more chunks; each section's data ends with an ``EOS`` chunk;
* a chunk: its flags (one byte here; ``0x80`` says another byte follows, twice), the node
  alias and the bitmap alias as counted strings when the flags say so (only when they
  change), then by kind: ``START``: granularity (be32) and start flags (one byte);
  ``BITS``: first sector (be64), sector count (be32) and, unless ``ZEROES``, the buffer
  size (be64) and the buffer; ``COMPLETE``: nothing.

Pure byte work, no QEMU: :func:`chunks` returns where each field is, the case splices.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EOS, ZEROES, BITMAP_NAME, DEVICE_NAME = 0x01, 0x02, 0x04, 0x08
START, COMPLETE, BITS, EXTRA_FLAGS = 0x10, 0x20, 0x40, 0x80
IDSTR = b"dirty-bitmap"


class StreamError(ValueError):
    """The stream has no dirty-bitmap section, or one this reader cannot follow."""


@dataclass(frozen=True)
class Chunk:
    """One chunk: its flags and where it and its fields start (offsets in the stream;
    -1 where the chunk has no such field)."""

    at: int
    flags: int
    node: str | None
    bitmap: str | None
    end: int
    version_at: int = -1  # of the section (START chunks of the setup section only)
    granularity_at: int = -1
    start_flags_at: int = -1
    buf_size_at: int = -1
    buf_at: int = -1


def _counted(data: bytes, pos: int) -> tuple[str, int]:
    n = data[pos]
    return data[pos + 1:pos + 1 + n].decode(errors="replace"), pos + 1 + n


def _section(data: bytes, pos: int) -> tuple[list[Chunk], int]:
    """The chunks from ``pos`` to the section's EOS (included)."""
    try:
        return _chunks_to_eos(data, pos)
    except (IndexError, struct.error) as e:
        raise StreamError(f"a bitmap chunk after {pos} runs past the end of the stream "
                          f"({e})") from e


def _chunks_to_eos(data: bytes, pos: int) -> tuple[list[Chunk], int]:
    out = []
    while True:
        if pos >= len(data):
            raise StreamError(f"the bitmap chunks run past the end of the stream at {pos}")
        at, flags = pos, data[pos]
        pos += 1
        if flags & EXTRA_FLAGS:
            raise StreamError(f"a chunk at {at} has more than one flag byte")
        node = bitmap = None
        if flags & DEVICE_NAME:
            node, pos = _counted(data, pos)
        if flags & BITMAP_NAME:
            bitmap, pos = _counted(data, pos)
        fields: dict[str, int] = {}
        if flags & START:
            fields = {"granularity_at": pos, "start_flags_at": pos + 4}
            pos += 5
        elif flags & BITS:
            pos += 12
            if not flags & ZEROES:
                (size,) = struct.unpack_from(">Q", data, pos)
                fields = {"buf_size_at": pos, "buf_at": pos + 8}
                pos += 8 + size
        out.append(Chunk(at, flags, node, bitmap, pos, **fields))
        if flags & EOS:
            return out, pos


def chunks(data: bytes) -> list[Chunk]:
    """Every bitmap chunk of the stream, in order: the setup section's (its first chunk
    also knows where the section's version id is), then those of the sections that
    continue it (``PART``, ``END``) with the same section id."""
    head = bytes([len(IDSTR)]) + IDSTR + struct.pack(">II", 0, 1)
    found = data.find(head)
    if found < 5 or data[found - 5] != 1:
        raise StreamError("no dirty-bitmap section in this stream (the dirty-bitmaps "
                          "capability off, or no bitmap to send)")
    section_id = data[found - 4:found]
    first, pos = _section(data, found + len(head))
    out = [Chunk(**{**first[0].__dict__, "version_at": found + len(head) - 4}), *first[1:]]
    while True:
        nxt = min((i for i in (data.find(bytes([2]) + section_id, pos),
                               data.find(bytes([3]) + section_id, pos)) if i >= 0),
                  default=-1)
        if nxt < 0:
            return out
        more, pos = _section(data, nxt + 5)
        out += more


def splice(data: bytes, at: int, drop: int, insert: bytes = b"") -> bytes:
    """``data`` with ``drop`` bytes at ``at`` replaced by ``insert``."""
    return data[:at] + insert + data[at + drop:]
