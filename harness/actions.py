"""The shared case vocabulary: the words cases are written in, each defined once.

Every word is plain QMP (or qemu-io over HMP, or qemu-img) underneath, sent through the
machine, so the oracle follows it like any other command: nothing here tells the model
anything. Keyword names are QMP names with ``_`` for ``-`` throughout.

* :func:`writes`: guest writes over regions, through a device or straight to a node;
* :func:`action`, :func:`bitmap_add`: ``transaction`` actions;
* :func:`add_target`, :func:`del_target`: backup targets (a fresh qcow2, or an
  incremental over the previous backup), added and removed over QMP;
* :func:`backup`: ``blockdev-backup`` with ``auto-dismiss: false`` run to its end;
* :func:`full_backup`, :func:`incremental_backup`: a backup that is restored and
  compared with the source at its start at once;
* :func:`migration_caps`, :func:`migrate`, :func:`wait_migration`: live migration between
  two VMs of the case (the oracle follows the bitmaps from the source's ``migrate`` to the
  destination).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from harness.backup import Case, Chain, create_target, reference, target_node, verify_restore
from harness.vm import VM

Regions = Sequence[tuple[int, int]]


def writes(vm: VM, target: str, regions: Regions, pattern: int | None = 0x5A,
           device: bool = False, zero: bool = False) -> None:
    """qemu-io writes of ``pattern`` (qemu-io's own with None; zero writes with ``zero``)
    over ``regions`` to ``target``: a node, or with ``device`` a guest device
    (``disk0/virtio-backend``), whose writes land in whatever its active layer is. Each
    is logged with its output."""
    for off, length in regions:
        what = "write -z" if zero else "write" if pattern is None else f"write -P {pattern:#x}"
        vm.qemu_io(target, f"{what} {off:#x} {length:#x}", log=True, device=device)


#: the qemu-io path of the virtio-blk device the cases attach as ``-device ...,id=disk0``
GUEST_DEVICE = "disk0/virtio-backend"


def guest_writes(vm: VM, regions: Regions, pattern: int, device: str = GUEST_DEVICE) -> None:
    """Writes through the guest's device: they land in whatever its active layer is
    (the base, an overlay after a snapshot, a backup's filter above it). A VM that boots
    a Linux guest (``qio.vm(..., guest=True)``) writes them itself, with O_DIRECT through
    the virtio-blk disk; any other VM gets qemu-io writes through the device."""
    if vm.has_guest:
        for off, length in regions:
            vm.guest.write(off, length, pattern, device.split("/", 1)[0])
        return
    writes(vm, device, regions, pattern, device=True)


def action(kind: str, **data: Any) -> dict[str, Any]:
    """One ``transaction`` action; ``data`` keywords are QMP names with ``_`` for ``-``."""
    return {"type": kind, "data": {k.replace("_", "-"): v for k, v in data.items()}}


def bitmap_add(node: str, name: str, granularity: int | None = None,
               **more: Any) -> dict[str, Any]:
    """The ``block-dirty-bitmap-add`` action (``persistent=True``, ``disabled=True``...)."""
    if granularity is not None:
        more["granularity"] = granularity
    return action("block-dirty-bitmap-add", node=node, name=name, **more)


def add_target(qio: Case, vm: VM, image: str, size: int, backing: str | None = None,
               inject: Sequence[dict[str, Any]] = ()) -> str:
    """A backup target: ``image`` created (over ``backing``, the previous backup) and
    added as the node named like the image without ``.qcow2``; returns that name."""
    create_target(qio.img, image, size, backing=backing)
    node = image.removesuffix(".qcow2")
    vm.qmp_log("blockdev-add", target_node(qio.scratch / image, node, inject))
    return node


def del_target(vm: VM, image: str) -> None:
    vm.qmp_log("blockdev-del", node_name=image.removesuffix(".qcow2"))


def backup_job(job: str, device: str, target: str, **more: Any) -> dict[str, Any]:
    """``blockdev-backup`` arguments with ``auto-dismiss: false``, so a failed job's error
    can still be read from ``query-jobs`` when it ends (run_job dismisses it)."""
    return {"job-id": job, "device": device, "target": target, "auto-dismiss": False,
            **{k.replace("_", "-"): v for k, v in more.items()}}


def backup(vm: VM, job: str, device: str, target: str, **more: Any) -> str | None:
    """``blockdev-backup`` (see :func:`backup_job`) run to its end; its error or None."""
    vm.qmp_log("blockdev-backup", backup_job(job, device, target, **more))
    return vm.run_job(job)


def full_backup(qio: Case, vm: VM, node: str, source: str, size: int, n: int = 0,
                image: str = "full.qcow2", bitmaps: Sequence[dict[str, Any]] = (),
                before: Sequence[dict[str, Any]] = ()) -> Chain:
    """``before`` actions, ``bitmaps`` (:func:`bitmap_add` actions) and a full backup of
    ``node`` (whose image is ``source``) in one transaction, so the bitmaps start exactly
    at the backup's point in time. Restored and compared at once."""
    ref = reference(qio, vm, node, source, n)
    target = add_target(qio, vm, image, size)
    job = f"backup{n}"
    vm.qmp_log("transaction", actions=[
        *before, *bitmaps,
        action("blockdev-backup", **backup_job(job, node, target, sync="full"))])
    assert vm.run_job(job) is None, f"{job} failed"
    del_target(vm, image)
    chain = Chain((image,))
    verify_restore(qio, chain, ref, f"backup-{n}")
    return chain


def incremental_backup(qio: Case, vm: VM, node: str, source: str, size: int, n: int,
                       chain: Chain, bitmap: str = "b0",
                       during: Callable[[], None] | None = None) -> Chain:
    """``sync=incremental`` from ``bitmap`` of ``node`` onto ``chain``; the bitmap is then
    checked exactly (the model knows every bit after a backup) and the chain restored.

    ``during`` runs while the job is running (guest writes): the job starts throttled to
    1 byte/s, so after its first chunk it waits (give it two dirty extents or more), and
    goes on at full speed (``block-job-set-speed``) when ``during`` has returned."""
    ref = reference(qio, vm, node, source, n)
    image = f"inc{n}.qcow2"
    target = add_target(qio, vm, image, size, chain.top)
    job = f"backup{n}"
    if during is None:
        error = backup(vm, job, node, target, sync="incremental", bitmap=bitmap)
    else:
        vm.qmp_log("blockdev-backup", backup_job(job, node, target, sync="incremental",
                                                 bitmap=bitmap, speed=1))
        during()
        vm.qmp_log("block-job-set-speed", device=job, speed=0)
        error = vm.run_job(job)
    assert error is None, f"{job} failed: {error}"
    del_target(vm, image)
    qio.oracle.check_exact(vm, node, [bitmap], f"after backup {n}")
    chain = chain.then(image)
    verify_restore(qio, chain, ref, f"backup-{n}")
    return chain


def migration_caps(vm: VM, **caps: bool) -> None:
    """``migrate-set-capabilities`` (``dirty_bitmaps=True, events=True``)."""
    vm.qmp_log("migrate-set-capabilities", capabilities=[
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])


def migrate(src: VM, dst: VM, uri: str, until: Sequence[str] | None = ("active",),
            **params: Any) -> str | None:
    """Start a migration from ``src`` to ``dst`` over ``uri`` (``unix:PATH``), capabilities
    already set on both (:func:`migration_caps`): the destination listens
    (``migrate-incoming``, unless it was started with ``-incoming URI``), the source's
    ``params`` are set (one ``migrate-set-parameters``: ``max_bandwidth=...``), then
    ``migrate``. Waits for a status in ``until`` (or an end) and returns it; None with
    ``until=None`` (the case goes on at once, e.g. to ``migrate-start-postcopy``)."""
    if dst.args[dst.args.index("-incoming") + 1] == "defer":
        dst.qmp_log("migrate-incoming", uri=uri)
    if params:
        src.qmp_log("migrate-set-parameters", **params)
    src.qmp_log("migrate", uri=uri)
    return None if until is None else wait_migration(src, until=until)


def migration_completed(src: VM, dst: VM) -> None:
    """Wait for a migration's end on the source, then on the destination; both must say
    ``completed``. The destination says so only once it has enabled the bitmaps it received
    and its guest runs again: before that, its bitmaps show as not recording even though
    the source is done. A case looks at the destination only after this."""
    for vm in (src, dst):
        status = wait_migration(vm)
        assert status == "completed", f"{vm.name}: the migration ended {status}"


#: where a migration stops moving: its end, or a pause that waits for the case
MIGRATION_ENDS = ("completed", "failed", "cancelled")


def wait_migration(vm: VM, until: Sequence[str] = MIGRATION_ENDS,
                   timeout: float = 60.0) -> str:
    """Wait for a MIGRATION event (``events`` capability on) whose status is in ``until``
    or an end; log that status (the ones on the way vary from run to run) and return it."""
    wanted = (*until, *MIGRATION_ENDS)
    ev = vm.event_wait("MIGRATION", timeout=timeout,
                       match=lambda e: e.get("data", {}).get("status") in wanted)
    status = str(ev["data"]["status"])
    if vm.transcript is not None:
        vm.transcript.log(f"{vm.log_prefix}migration: {status}")
    return status
