"""The copy-before-write filter and its snapshot-access view, as a fleecing user meets them.

test_backup_pull takes whole pull-mode backups through a fleecing view; this module goes
after what can go wrong inside one view, on a VM without a guest (requests go through
the filter node with qemu-io, the way a guest's pass through it):

* a guest **discard** or **write-zeroes** under the view: the filter must save the old
  data first, exactly as for a write, so the view still reads the disk as it was; the
  sync bitmap records both;
* a **discard on the view** (``snapshot-access``): the user says it is done with that
  area; QEMU drops it from the view (a read there fails, even one that starts in the
  middle of a cluster), discards what the fleecing image held for it, and copies
  nothing more for it when the guest writes there; the rest of the view is unchanged;
* a **failed copy**: ``on-cbw-error=break-guest-write`` fails the guest write and keeps
  the view; ``break-snapshot`` lets the write through and fails every read of the view
  from then on (a view that silently misses the old data would be a corrupt backup);
* filters QEMU must refuse to create: a bitmap that does not exist, one of a node of
  another size, one that is inconsistent (its image was not closed cleanly).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.actions import writes
from harness.backup import (
    NbdExport,
    Reference,
    compare_export,
    nbd_export_add,
    nbd_server_start,
    reference,
)
from harness.errors import LaunchError, OracleFailure
from harness.model import Extents, format_ranges
from harness.qcow2 import BME_FLAG_AUTO, BME_FLAG_IN_USE
from harness.qcow2_writer import BitmapSpec, write_bitmaps
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
GRAN = 64 << 10
NODE = "drive0"
EIO = 5

W0 = ((0, 0x20000), (0x100000, 0x10000), (0x200000, 0x30000), (0x3F0000, 0x10000))

REQUIRES = pytest.mark.requires(qmp=["nbd-server-start", "block-export-add"],
                                drivers=["copy-before-write", "snapshot-access"])


def start(qio: Case) -> VM:
    """The source: qcow2 with ``discard=unmap`` (so a discard reaches the driver)."""
    return qio.vm_on("src.qcow2", NODE, discard="unmap", launch=True,
                     create=None if qio.path("src.qcow2").exists() else SIZE)


def written_with_b0(qio: Case, vm: VM) -> Reference:
    """The writes ``W0``, then b0, then reference 0 of the disk as the view must show it."""
    writes(vm, NODE, W0, 0x11)
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b0", granularity=GRAN)
    return reference(qio, vm, NODE, "src.qcow2", 0)


def fleecing(qio: Case, vm: VM, inject: tuple[dict[str, Any], ...] = (),
             **cbw: Any) -> NbdExport:
    """fleece.qcow2 (over a blkdebug with ``inject``) as the target of a copy-before-write
    filter ``fl-cbw`` over the source, a ``snapshot-access`` node ``fl-access`` on it,
    exported read-only over NBD as ``view``. Every node passes discards down."""
    qio.img.create("fleece.qcow2", SIZE)
    file: dict[str, Any] = {"driver": "file", "filename": str(qio.path("fleece.qcow2"))}
    if inject:
        file = {"driver": "blkdebug", "image": file, "inject-error": list(inject)}
    vm.qmp_log("blockdev-add", driver="qcow2", node_name="fleece", backing=None,
               discard="unmap", file=file)
    vm.qmp_log("blockdev-add", driver="copy-before-write", node_name="fl-cbw", file=NODE,
               target="fleece", discard="unmap", **cbw)
    vm.qmp_log("blockdev-add", driver="snapshot-access", node_name="fl-access",
               file="fl-cbw", discard="unmap")
    socket = vm.socket_path.parent / "view.nbd"
    nbd_server_start(vm, socket)
    return nbd_export_add(vm, "fl-access", "view", socket)


def copies(qio: Case, vm: VM) -> Extents:
    """The guest ranges fleece.qcow2 holds data for (the filter's copies); a discarded
    cluster of it reads as zeroes and holds none."""
    vm.qemu_io("fleece", "flush")
    out = Extents()
    for e in qio.img.json("map", "-U", "fleece.qcow2"):
        if e.get("data") and e.get("depth", 0) == 0:
            out.add(int(e["start"]), int(e["length"]))
    qio.log.log(f"fleece.qcow2 holds data for {format_ranges(out)}")
    return out


def view_equals(qio: Case, export: NbdExport, ref: Reference,
                window: tuple[int, int] | None = None) -> None:
    """The view (or a window of it) reads exactly like the reference."""
    cmp = compare_export(qio, export, ref, window)
    where = "" if window is None else f" in {window[0]:#x}+{window[1]:#x}"
    if not cmp.identical:
        raise OracleFailure(f"the view{where} differs from reference {ref.n} at offset "
                            f"{cmp.first_offset:#x}: the filter did not save the old data")
    qio.log.log(f"view{where}: identical to reference {ref.n}")


def view_read_fails(qio: Case, export: NbdExport, offset: int, length: int) -> None:
    """A read of the view over NBD must fail; its error goes to the transcript."""
    res = qio.io.run("-r", "--image-opts", "-c", f"read {offset:#x} {length:#x}",
                     export.image_opts(), check=False)
    out = (res.stdout + res.stderr).strip()
    assert "failed" in out, f"the view read {offset:#x}+{length:#x} although it must not: {out}"
    qio.log.log(f"view: read {offset:#x}+{length:#x}: {out.splitlines()[-1]}")


@REQUIRES
def test_discard_and_zeroes_under_the_view(qio: Case) -> None:
    vm = start(qio)
    qio.log.heading("writes; then b0, and a view of the disk exported over NBD")
    ref = written_with_b0(qio, vm)
    export = fleecing(qio, vm)

    qio.log.heading("through the filter: a discard, a zero write, a zero write that may "
                    "unmap; the disk reads zeroes there, the view still the old data")
    for command in ("discard 0x100000 0x10000", "write -z 0x200000 0x10000",
                    "write -z -u 0x210000 0x10000"):
        vm.qemu_io("fl-cbw", command, log=True)
    for command in ("read -P 0 0x100000 0x10000", "read -P 0 0x200000 0x20000",
                    "read -P 0x11 0x220000 0x10000"):
        vm.qemu_io("fl-cbw", command, log=True)
    view_equals(qio, export, ref)
    qio.oracle.check_exact(vm, NODE, ["b0"], "after the discard and zero writes")

    qio.log.heading("the user discards two clusters of the view: one the filter saved "
                    "(0x100000), one it never had to (0x0)")
    copies(qio, vm)
    for off in (0x100000, 0x0):
        vm.qemu_io("fl-access", f"discard {off:#x} 0x10000", log=True)
    qio.log.log("reads of a discarded area fail, also one that starts inside a cluster:")
    for off, length in ((0x100000, 0x10000), (0x0, 0x10000), (0x200, 0x200)):
        view_read_fails(qio, export, off, length)
    # over NBD the server asks the block status first; a read inside QEMU reads at once
    out = vm.qemu_io("fl-access", "read 0x100000 0x10000", log=True, check=False)
    assert "failed" in out, f"QEMU read a discarded area of the view: {out}"
    for window in ((0x10000, 0x10000), (0x200000, 0x30000), (0x3F0000, 0x10000)):
        view_equals(qio, export, ref, window)

    qio.log.heading("a guest write into the discarded cluster 0x0 is not copied any more; "
                    "the copy of 0x100000 is gone from fleece.qcow2")
    vm.qemu_io("fl-cbw", "write -P 0x22 0x0 0x1000", log=True)
    now = copies(qio, vm)
    assert not now.window(0x0, 0x10000), "the filter copied a cluster the view dropped"
    assert not now.window(0x100000, 0x110000), "the dropped copy is still in fleece.qcow2"
    assert not Extents([(0x200000, 0x20000)]).minus(now), "the view's other copies are gone"
    qio.oracle.check_exact(vm, NODE, ["b0"], "after the view's discard")
    vm.shutdown()


# the first write into fleece.qcow2's file: the filter's first copy
COPY_EIO = {"event": "pwritev", "iotype": "write", "errno": EIO, "once": True}


@REQUIRES
@pytest.mark.requires(args=["blockdev-add.on-cbw-error", "blockdev-add.cbw-timeout"])
@pytest.mark.parametrize("on_error", ["break-guest-write", "break-snapshot"])
def test_failed_copy(qio: Case, on_error: str) -> None:
    """The filter's copy into the fleecing image fails once (EIO)."""
    vm = start(qio)
    qio.log.heading("writes; b0; a view whose fleecing image fails its first writes")
    ref = written_with_b0(qio, vm)
    # break-guest-write: one failure for each of the write, discard and zero write below
    failures = 3 if on_error == "break-guest-write" else 1
    export = fleecing(qio, vm, inject=(COPY_EIO,) * failures, on_cbw_error=on_error,
                      cbw_timeout=60)

    qio.log.heading(f"a guest write over data the view must keep; on-cbw-error={on_error}")
    out = vm.qemu_io("fl-cbw", "write -P 0x22 0x100000 0x1000", log=True, check=False)
    if on_error == "break-guest-write":
        assert "failed" in out, "the guest write passed although its copy failed"
        for command in ("discard 0x200000 0x10000", "write -z 0x3f0000 0x10000"):
            out = vm.qemu_io("fl-cbw", command, log=True, check=False)
            assert "failed" in out, f"{command} passed although its copy failed"
        for command in ("read -P 0x11 0x100000 0x10000", "read -P 0x11 0x200000 0x10000",
                        "read -P 0x11 0x3f0000 0x10000"):
            vm.qemu_io("fl-cbw", command, log=True)
        view_equals(qio, export, ref)
        qio.log.heading("the next write is copied first, and the view keeps it")
        vm.qemu_io("fl-cbw", "write -P 0x22 0x100000 0x1000", log=True)
        view_equals(qio, export, ref)
    else:
        assert "failed" not in out, "the guest write failed although the snapshot breaks"
        qio.log.log("the view is broken: every read of it fails, where the guest wrote and "
                    "elsewhere")
        for off, length in ((0x100000, 0x1000), (0x3F0000, 0x10000), (0x300000, 0x10000)):
            view_read_fails(qio, export, off, length)
        qio.log.heading("the next guest write passes without a copy")
        vm.qemu_io("fl-cbw", "write -P 0x33 0x200000 0x1000", log=True)
        copies(qio, vm)
    qio.oracle.check_exact(vm, NODE, ["b0"], "after the failed copy")
    vm.shutdown()


@REQUIRES
@pytest.mark.requires(args=["blockdev-add.bitmap.node"])
def test_refused_filters(qio: Case) -> None:
    """A filter QEMU must refuse: its bitmap says what the view holds; a bitmap it cannot
    use must stop it, never give a view with made-up contents."""
    qio.img.create("src.qcow2", SIZE)
    written = write_bitmaps(qio.path("src.qcow2"), [
        BitmapSpec("stale", flags=BME_FLAG_IN_USE | BME_FLAG_AUTO, dirty=((0, 0x10000),))])
    qio.oracle.crafted(written, "bitmap 'stale' stored in use: its QEMU was not closed "
                       "cleanly")
    vm = start(qio)
    qio.show_bitmaps(vm, NODE, hashes=False)
    qio.img.create("small.qcow2", SIZE // 2)
    vm.qmp_log("blockdev-add", driver="qcow2", node_name="small",
               file={"driver": "file", "filename": str(qio.path("small.qcow2"))})
    vm.qmp_log("block-dirty-bitmap-add", node="small", name="s0", granularity=GRAN)
    qio.img.create("fleece.qcow2", SIZE)
    vm.qmp_log("blockdev-add", driver="qcow2", node_name="fleece", backing=None,
               file={"driver": "file", "filename": str(qio.path("fleece.qcow2"))})
    for what, bitmap, error in (
            ("a bitmap that does not exist", {"node": NODE, "name": "nope"}, "not found"),
            ("a bitmap of a node of another size", {"node": "small", "name": "s0"},
             "different sizes"),
            ("an inconsistent bitmap", {"node": NODE, "name": "stale"}, "inconsistent")):
        qio.log.heading(f"refused: {what}")
        vm.qmp_log("blockdev-add", driver="copy-before-write", node_name="fl-cbw", file=NODE,
                   target="fleece", bitmap=bitmap, expect_error=error)
        names = sorted(n["node-name"] for n in vm.qmp("query-named-block-nodes"))
        assert "fl-cbw" not in names, f"a refused filter is in the graph: {names}"
    vm.shutdown()


@pytest.mark.requires(drivers=["copy-before-write"], args=["blockdev-add.on-cbw-error"])
@pytest.mark.parametrize("bad", [
    pytest.param("on-cbw-error=bogus", id="bad-value"),
    pytest.param("bitmap=b0,bitmap.node=drive0", id="scalar-and-object"),
])
def test_flat_options_refused(qio: Case, bad: str) -> None:
    """``-drive`` hands the filter flat options, which it parses itself (``-blockdev`` and
    ``blockdev-add`` are checked against the schema first): a bad one stops QEMU at
    start with one message naming it."""
    for image in ("src.qcow2", "fleece.qcow2"):
        qio.img.create(image, SIZE)
    drive = ("if=none,id=fl0,driver=copy-before-write,file.driver=qcow2,file.file.driver=file,"
             f"file.file.filename={qio.path('src.qcow2')},target.driver=qcow2,"
             f"target.file.driver=file,target.file.filename={qio.path('fleece.qcow2')},{bad}")
    vm = qio.vm(machine_type="none", args=["-drive", drive])
    with pytest.raises(LaunchError):
        vm.launch()
    last = vm.log_path.read_text().strip().splitlines()[-1]
    message = last.rsplit(f",{bad}: ", 1)[-1]
    assert message != last, f"QEMU's message does not name the -drive option: {last}"
    qio.log.log(f"-drive ...,{bad}: {message}")
