"""Offline bitmap management with ``qemu-img bitmap`` and ``qemu-img convert --bitmaps``.

Every offline operation is checked twice: by what ``qemu-img info`` reads from the header
and by opening the image in QEMU afterwards (is the bitmap there, recording or not, with
which count and which hash). A ``qemu-img`` that only rewrote the directory entry, or a
QEMU that loaded the bitmap differently from how it was stored, shows up in one of them.
"""

from __future__ import annotations

import pytest

from harness.bitmaps import LiveBitmap, live_bitmaps, sha256
from harness.errors import ToolError
from harness.session import Case

pytestmark = pytest.mark.quick

SIZE = 64 << 20
WRITES = ((0, 0x10000), (0x123400, 0x800), (0x3FF0000, 0x10000))


def look(qio: Case, image: str) -> dict[str, tuple[LiveBitmap, str]]:
    """Log the header view and QEMU's view of ``image``; return QEMU's (bitmap, hash)."""
    qio.show_image_bitmaps(image)
    vm = qio.vm_on(image, name="look", launch=True)
    seen = {b.name: (b, sha256(vm, "drive0", b.name)) for b in live_bitmaps(vm, "drive0")}
    qio.show_bitmaps(vm, "drive0")
    vm.shutdown()
    return seen


def dirty(qio: Case, image: str, bitmaps: list[str]) -> None:
    """Start QEMU, add persistent bitmaps at run time, write WRITES, store at close."""
    vm = qio.vm_on(image, name="writer", launch=True)
    for b in bitmaps:
        vm.qmp("block-dirty-bitmap-add", node="drive0", name=b, persistent=True)
    for off, length in WRITES:
        vm.qemu_io("drive0", f"write -P 0x5a {off:#x} {length:#x}")
    vm.shutdown()
    qio.log.log(f"(QEMU wrote {len(WRITES)} regions with {', '.join(bitmaps)} recording)")


@pytest.fixture
def disk(qio: Case) -> str:
    qio.img.create("disk.qcow2", SIZE)
    return "disk.qcow2"


def test_add_enable_disable_remove(qio: Case, disk: str) -> None:
    qio.log.heading("add: default granularity, 512 B granularity, disabled")
    qio.img.run("bitmap", "--add", disk, "b0", log=True)
    qio.img.run("bitmap", "--add", "-g", "512", disk, "b1", log=True)
    qio.img.run("bitmap", "--add", "--disable", disk, "b2", log=True)
    seen = look(qio, disk)
    assert {n: (b.granularity, b.recording, b.count) for n, (b, _) in seen.items()} == {
        "b0": (65536, True, 0), "b1": (512, True, 0), "b2": (65536, False, 0)}

    qio.log.heading("QEMU writes: enabled bitmaps record, the disabled one does not")
    vm = qio.vm_on(disk, launch=True)
    for off, length in WRITES:
        vm.qemu_io("drive0", f"write -P 0x5a {off:#x} {length:#x}", log=True)
    vm.shutdown()
    seen = look(qio, disk)
    assert seen["b0"][0].count == 3 * 0x10000
    assert seen["b1"][0].count == 0x10000 + 0x800 + 0x10000
    assert seen["b2"][0].count == 0

    qio.log.heading("disable b0, enable b2: only b2 records the next write")
    qio.img.run("bitmap", "--disable", disk, "b0", log=True)
    qio.img.run("bitmap", "--enable", disk, "b2", log=True)
    vm = qio.vm_on(disk, launch=True)
    vm.qemu_io("drive0", "write -P 0x6b 0x2000000 0x1000", log=True)
    vm.shutdown()
    after = look(qio, disk)
    assert after["b0"][1] == seen["b0"][1], "a disabled bitmap changed"
    assert not after["b0"][0].recording and after["b2"][0].recording
    assert after["b2"][0].count == 0x10000

    qio.log.heading("remove b1")
    qio.img.run("bitmap", "--remove", disk, "b1", log=True)
    assert sorted(look(qio, disk)) == ["b0", "b2"]

    qio.log.heading("errors: add an existing name, remove a missing one")
    with pytest.raises(ToolError):
        qio.img.run("bitmap", "--add", disk, "b0")
    qio.log.log("qemu-img bitmap --add disk.qcow2 b0: refused (exists)")
    with pytest.raises(ToolError):
        qio.img.run("bitmap", "--remove", disk, "nosuch")
    qio.log.log("qemu-img bitmap --remove disk.qcow2 nosuch: refused (missing)")
    assert sorted(look(qio, disk)) == ["b0", "b2"]


def test_clear_and_merge(qio: Case, disk: str) -> None:
    qio.log.heading("QEMU dirties a and b; c is added empty and disabled offline")
    dirty(qio, disk, ["a", "b"])
    qio.img.run("bitmap", "--add", "--disable", disk, "c", log=True)
    before = look(qio, disk)
    assert before["a"][1] == before["b"][1] != before["c"][1]

    qio.log.heading("merge a into c: c gets a's bits, a is unchanged")
    qio.img.run("bitmap", "--merge", "a", disk, "c", log=True)
    merged = look(qio, disk)
    assert merged["c"][1] == before["a"][1] and merged["a"][1] == before["a"][1]
    assert not merged["c"][0].recording, "merge must not enable the target"

    qio.log.heading("clear b: empty, still enabled")
    qio.img.run("bitmap", "--clear", disk, "b", log=True)
    cleared = look(qio, disk)
    assert cleared["b"][0].count == 0 and cleared["b"][0].recording

    qio.log.heading("merge from another image into b, then a into b: the union")
    vm = qio.vm_on("other.qcow2", name="other", create=SIZE, launch=True)
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="x", persistent=True)
    vm.qemu_io("drive0", "write -P 0x77 0x1000000 0x30000")
    vm.shutdown()
    qio.img.run("bitmap", "--merge", "x", "-b", "other.qcow2", "-F", "qcow2", disk, "b",
                log=True)
    only_x = look(qio, disk)
    assert only_x["b"][0].count == 0x30000
    qio.img.run("bitmap", "--merge", "a", disk, "b", log=True)
    union = look(qio, disk)
    # merging must OR: b keeps x's clusters and gains a's
    assert union["b"][0].count == 0x30000 + before["a"][0].count


def test_convert_bitmaps(qio: Case, disk: str) -> None:
    qio.log.heading("source: dirty bitmaps a (then disabled) and b, an empty one at 512 B")
    dirty(qio, disk, ["a", "b"])
    qio.img.run("bitmap", "--add", "-g", "512", disk, "g512", log=True)
    qio.img.run("bitmap", "--disable", disk, "a", log=True)
    src = look(qio, disk)

    qio.log.heading("convert --bitmaps: every bitmap arrives with its bits and state")
    qio.img.run("convert", "-O", "qcow2", "--bitmaps", disk, "copy.qcow2", log=True)
    copy = look(qio, "copy.qcow2")
    assert {n: (b.granularity, b.recording, b.count, h) for n, (b, h) in copy.items()} == {
        n: (b.granularity, b.recording, b.count, h) for n, (b, h) in src.items()}
    qio.img.run("compare", disk, "copy.qcow2", log=True)

    qio.log.heading("convert without --bitmaps: no bitmaps")
    qio.img.run("convert", "-O", "qcow2", disk, "plain.qcow2", log=True)
    assert look(qio, "plain.qcow2") == {}
