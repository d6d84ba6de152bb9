"""harness/migstream.py on streams built here byte by byte, and the oracle's file URIs."""

from __future__ import annotations

import struct

import pytest

from harness import migstream
from harness.migration import file_of

SID = struct.pack(">I", 7)


def counted(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def stream() -> bytes:
    """A configuration-ish prefix, the setup section (two STARTs, EOS, footer), an
    unrelated section, a PART (EOS) and the END section (BITS, ZEROES BITS, COMPLETE)."""
    setup = (bytes([migstream.START | migstream.DEVICE_NAME | migstream.BITMAP_NAME])
             + counted("drive0") + counted("b0") + struct.pack(">IB", 4096, 1)
             + bytes([migstream.START | migstream.BITMAP_NAME]) + counted("t0")
             + struct.pack(">IB", 65536, 0) + bytes([migstream.EOS]))
    end = (bytes([migstream.BITS | migstream.BITMAP_NAME]) + counted("b0")
           + struct.pack(">QI", 0, 128) + struct.pack(">Q", 16) + b"\xff" * 16
           + bytes([migstream.BITS | migstream.ZEROES | migstream.BITMAP_NAME])
           + counted("t0") + struct.pack(">QI", 0, 128)
           + bytes([migstream.COMPLETE]) + bytes([migstream.EOS]))
    return (b"QEVM\0\0\0\3" + b"\x01" + SID + counted("dirty-bitmap")
            + struct.pack(">II", 0, 1) + setup + b"\x7e" + SID
            + b"\x01\0\0\0\x09" + counted("timer") + struct.pack(">II", 0, 2) + b"\0" * 9
            + b"\x02" + SID + bytes([migstream.EOS]) + b"\x7e" + SID
            + b"\x03" + SID + end + b"\x7e" + SID)


def test_chunks_in_order_with_their_fields() -> None:
    data = stream()
    cs = migstream.chunks(data)
    assert [(c.flags & 0x70, c.node, c.bitmap) for c in cs] == [
        (migstream.START, "drive0", "b0"), (migstream.START, None, "t0"), (0, None, None),
        (0, None, None), (migstream.BITS, None, "b0"), (migstream.BITS, None, "t0"),
        (migstream.COMPLETE, None, None), (0, None, None)]
    assert struct.unpack_from(">I", data, cs[0].version_at) == (1,)
    assert struct.unpack_from(">I", data, cs[1].granularity_at) == (65536,)
    assert data[cs[0].start_flags_at] == 1
    bits = cs[4]
    assert struct.unpack_from(">Q", data, bits.buf_size_at) == (16,)
    assert data[bits.buf_at:bits.end] == b"\xff" * 16
    assert cs[5].buf_at == -1  # ZEROES: no buffer


def test_no_bitmap_section_says_so() -> None:
    with pytest.raises(migstream.StreamError, match="no dirty-bitmap section"):
        migstream.chunks(b"QEVM\0\0\0\3\x01" + SID + counted("timer"))


@pytest.mark.parametrize("cut", [0, 3, 9])  # at a chunk, in a name, in a granularity
def test_cut_stream_says_where(cut: int) -> None:
    data = stream()
    with pytest.raises(migstream.StreamError, match="past the end"):
        migstream.chunks(data[:migstream.chunks(data)[1].at + cut])


def test_splice() -> None:
    assert migstream.splice(b"abcdef", 2, 2, b"XYZ") == b"abXYZef"


@pytest.mark.parametrize(("uri", "writes", "path"), [
    ("exec:cat > /tmp/x.mig", True, "/tmp/x.mig"),
    ("exec:cat /tmp/x.mig", False, "/tmp/x.mig"),
    ("exec:cat > /tmp/x.mig", False, None),
    ("unix:/tmp/s", True, None),
    ("exec:cat | gzip", False, None),
    (None, False, None),
])
def test_file_of(uri: str | None, writes: bool, path: str | None) -> None:
    assert file_of(uri, writes) == path
