"""The model (oracle) on its own: extents, rounding, bitmap operations, commit, verdicts."""

from __future__ import annotations

import pytest

from harness.errors import ModelError
from harness.model import Extents, Model, format_ranges

MiB = 1 << 20


def test_extents_merge_adjacent_and_overlapping() -> None:
    e = Extents([(0, 10), (10, 5), (30, 10), (35, 10), (100, 0)])
    assert list(e) == [(0, 15), (30, 15)]
    e.add(14, 17)
    assert list(e) == [(0, 45)]


def test_extents_minus() -> None:
    a = Extents([(0, 100), (200, 100)])
    b = Extents([(10, 10), (50, 200)])
    assert list(a.minus(b)) == [(0, 10), (20, 30), (250, 50)]
    assert list(b.minus(a)) == [(100, 100)]
    assert not a.minus(a)


def test_rounding_to_granularity_and_clipping() -> None:
    e = Extents([(0xFFF00, 0x10000), (MiB - 1, 2)])
    assert list(e.rounded(0x10000, 4 * MiB)) == [(0xF0000, 0x20000)]
    # the last granule is clipped at the disk size (QEMU never reports past it)
    assert list(Extents([(4 * MiB - 512, 512)]).rounded(3 * MiB, 4 * MiB)) == [(3 * MiB, MiB)]


def test_writes_reach_only_recording_bitmaps_of_their_node() -> None:
    m = Model()
    m.node("base", 4 * MiB)
    m.node("top", 4 * MiB)
    m.add_bitmap("base", "on")
    m.add_bitmap("base", "off", recording=False)
    m.write("base", 0, 512)
    m.write("top", MiB, 512)
    assert list(m.bitmap("base", "on").required(4 * MiB)) == [(0, 0x10000)]
    assert not m.bitmap("base", "off").required(4 * MiB)


def test_commit_moves_top_data_into_base_bitmaps() -> None:
    m = Model()
    for n in ("base", "mid", "top"):
        m.node(n, 4 * MiB)
    m.add_bitmap("base", "b")
    m.write("mid", 0x20000, 1)
    m.write("top", 0x40000, 1)
    m.commit("top", "base", through=["mid"])
    assert list(m.bitmap("base", "b").required(4 * MiB)) == [(0x20000, 0x10000),
                                                              (0x40000, 0x10000)]


def test_merge_is_a_union_and_clear_empties() -> None:
    m = Model()
    m.node("n", MiB)
    m.add_bitmap("n", "a")
    m.add_bitmap("n", "b", granularity=512)
    m.write("n", 0, 1)
    m.disable("n", "a")
    m.write("n", 0x80000, 1)
    m.merge("n", "b", [("n", "a")])
    assert list(m.bitmap("n", "b").required(MiB)) == [(0, 0x10000), (0x80000, 512)]
    m.clear("n", "b")
    assert not m.bitmap("n", "b").required(MiB)


def test_verdict_missing_fails_extra_does_not() -> None:
    m = Model()
    m.node("n", MiB)
    m.add_bitmap("n", "a")
    m.write("n", 0, 0x20000)
    v = m.verdict("n", "a", [(0, 0x10000), (0x80000, 0x10000)])
    assert not v.ok
    assert list(v.missing) == [(0x10000, 0x10000)]
    assert list(v.extra) == [(0x80000, 0x10000)]
    assert "missing [0x10000+0x10000]" in v.failure("live")
    assert "INCOMPLETE" in v.describe()
    # extra dirty clusters alone are allowed
    assert m.verdict("n", "a", [(0, 0x30000)]).ok
    # an inconsistent bitmap is never judged incomplete: QEMU refuses to use it
    inconsistent = m.verdict("n", "a", [], inconsistent=True)
    assert inconsistent.ok and "inconsistent" in inconsistent.describe()


def test_model_refuses_impossible_steps() -> None:
    m = Model()
    m.node("n", MiB)
    with pytest.raises(ModelError, match="no node 'x'"):
        m.write("x", 0, 1)
    with pytest.raises(ModelError, match="outside node 'n'"):
        m.write("n", MiB - 1, 2)
    m.add_bitmap("n", "a")
    with pytest.raises(ModelError, match="already exists"):
        m.add_bitmap("n", "a")
    with pytest.raises(ModelError, match="no bitmap 'b'"):
        m.disable("n", "b")


def test_format_ranges_is_short() -> None:
    text = format_ranges([(i * 0x20000, 0x10000) for i in range(20)], limit=3)
    assert text == "[0x0+0x10000, 0x20000+0x10000, 0x40000+0x10000, ... (17 more)]"


def test_resize_keeps_the_granule_holding_the_new_end_and_drops_the_rest() -> None:
    """block_resize: QEMU clears only whole granules past the new end, and a grown
    disk's new part is clean; the data past a shrunk end is gone."""
    m = Model()
    m.node("d0", 4 * MiB)
    m.add_bitmap("d0", "b", granularity=0x10000)
    m.write("d0", 0x2F000, 0x1000)    # in the granule [0x20000, 0x30000)
    m.write("d0", 0x3F0000, 0x10000)  # the last granule
    m.resize("d0", 0x28000)           # the end falls inside [0x20000, 0x30000)
    assert list(m.nodes["d0"].data) == []
    assert list(m.bitmap("d0", "b").required(0x28000)) == [(0x20000, 0x8000)]
    m.resize("d0", 4 * MiB)           # the kept granule is whole again; the rest is clean
    assert list(m.bitmap("d0", "b").required(4 * MiB)) == [(0x20000, 0x10000)]


def test_resize_cuts_data_in_place() -> None:
    """The model node shares its data extents with the image: the cut must be in place."""
    shared = Extents([(0, 0x1000), (0x3000, 0x2000)])
    m = Model()
    m.node("d0", 0x10000).data = shared
    m.resize("d0", 0x4000)
    assert list(shared) == [(0, 0x1000), (0x3000, 0x1000)]


def test_window_keeps_the_part_inside() -> None:
    e = Extents([(0, 0x1000), (0x3000, 0x2000), (0x8000, 0x1000)])
    assert list(e.window(0x800, 0x4000)) == [(0x800, 0x800), (0x3000, 0x1000)]
    assert list(e.window(0x6000, 0x7000)) == []
