"""Live migration of dirty bitmaps between two QEMU processes (iotest 169 ground).

The source and the destination are two ``qemu-system-x86_64`` of the case; the migration
goes over a unix socket in the case's socket dir. Nothing here tells the oracle what to
expect: it follows ``migrate`` with the ``dirty-bitmaps`` capability by itself
(harness/migration.py has QEMU's rules) and checks every bitmap on the destination live
before it quits and in the image after, and again in a third VM opened on the image.

Writes while migrating: the source's bandwidth is throttled so the migration stays
``active`` while qemu-io writes land, then released; the bitmaps must hold those writes.

Post-copy (``migrate-start-postcopy``): with ``postcopy-ram``, or with ``dirty-bitmaps``
alone, which also gives QEMU a post-copy phase for the bitmaps. The destination runs
before its bitmaps have arrived (busy, the enabled ones recording into nameless
successors); writes there must be in them once the migration completes. Post-copy of RAM
needs userfaultfd: as root it works here; elsewhere the case skips with QEMU's reason.

If the source dies in post-copy (``test_postcopy_source_killed``), the destination of a
bitmaps-only post-copy runs on, reports ``completed`` and has dropped every bitmap that
was still on the way.

``test_bitmap_mapping_aliases``: a ``block-bitmap-mapping`` on each side renames the node
and a bitmap, makes a transient bitmap persistent on the way and leaves the unlisted ones
home (the persistent one then reaches the destination through the shared image).

``test_guest_writes_while_migrating``: a real Linux guest (``harness/guest.py``) writes
with ``dd oflag=direct`` through its virtio-blk disk while the migration is active, and on
the destination once it has moved there (``dst.guest.continues_from(src.guest)``), in
post-copy while its bitmaps are still on the way. Its requests are page-aligned, so the
512-byte-granularity bitmap shows dirty bytes around a 1 KiB write (extra, not missing).

Storage migration (``test_storage_migration_mirror``): each VM has its own image; the
destination exports its own over NBD and the source mirrors into it before migrating, as
libvirt does. The writes go through a virtio-blk device so that they pass the mirror's
filter node: written to the node below it (HMP qemu-io on the node), QEMU 10.0 does not
copy them to the target (7.2's mirror still sees them through its dirty bitmap).

A migration that fails (``migrate_cancel``, the destination SIGKILLed mid-way) must leave
the source's bitmaps as they were, usable for the next incremental backup and for the
next migration. QEMU bug found here: after such a failure the source no longer stores its
persistent bitmaps when it quits (``test_failed_migration_then_quit``), and the next
migration sends them as transient (``test_failed_migration_then_retry``), which also
spoils the retry of a failed storage migration.
"""

from __future__ import annotations

import signal
from functools import partial

import pytest

from harness.actions import (
    add_target,
    backup,
    bitmap_add,
    full_backup,
    guest_writes,
    incremental_backup,
    migrate,
    migration_caps,
    migration_completed,
    wait_migration,
    writes,
)
from harness.errors import CommandError, OracleFailure
from harness.session import Case
from harness.vm import VM

SIZE = 16 << 20
NODE = "drive0"
#: name, granularity, persistent, enabled: every combination, four granularities
BITMAPS = (
    ("persistent-on", 512, True, True),
    ("persistent-off", 65536, True, False),
    ("transient-on", 4096, False, True),
    ("transient-off", 1 << 20, False, False),
)
BEFORE = ((0, 0x10000), (0xF0000, 0x10000), (0xA0201, 0x1000))
WHILE_ENABLED = ((0x300000, 0x800),)  # before the "-off" bitmaps are disabled
DURING = ((0x400000, 0x1000), (0x7FFE00, 0x400))  # the migration is active
AFTER = ((SIZE - 0x200, 0x200), (0x200000, 0x20000))  # on the destination
THROTTLED = 1000  # bytes/s: the RAM pass takes ages, the migration stays active
RELEASED = 1 << 30


def vm_for(qio: Case, name: str, image: str, incoming: str | None = None,
           device: bool = False, node: str = NODE, guest: bool = False) -> VM:
    """:meth:`Case.vm_on` as every VM of this module is: a ``pc`` (it has RAM to migrate,
    which the throttled migrations rely on) that says its name in the transcript. With
    ``device`` the writes pass through the filters a job inserts above the node (a
    mirror's)."""
    return qio.vm_on(image, node, name, device=device, guest=guest, incoming=incoming,
                     machine_type="pc", log_prefix=f"{name}: ")


def add_bitmaps(vm: VM, device: bool = False) -> None:
    """Every bitmap of BITMAPS with its own history: the disabled ones stop recording
    after the first writes (written through the VM's device if it has one)."""
    for name, gran, persistent, _ in BITMAPS:
        vm.qmp_log("block-dirty-bitmap-add", node=NODE, name=name, granularity=gran,
                   persistent=persistent)
    put = guest_writes if device else partial(writes, target=NODE)
    put(vm, regions=BEFORE, pattern=0x11)
    put(vm, regions=WHILE_ENABLED, pattern=0x22)
    for name, _, _, enabled in BITMAPS:
        if not enabled:
            vm.qmp_log("block-dirty-bitmap-disable", node=NODE, name=name)


@pytest.mark.parametrize("capability", [True, False], ids=["dirty-bitmaps", "without"])
def test_shared_storage_precopy(qio: Case, capability: bool) -> None:
    """Both VMs open the same image. With the capability every bitmap travels in the
    stream (the source skips storing the persistent ones); without it the persistent
    ones go through the image (stored at the source's inactivation, loaded by the
    destination) and the transient ones stay behind."""
    qio.img.create("disk.qcow2", SIZE)
    sock = qio.sockdir / "mig.sock"
    src = vm_for(qio, "src", "disk.qcow2")
    dst = vm_for(qio, "dst", "disk.qcow2", incoming="defer")
    src.launch()
    dst.launch()
    add_bitmaps(src)

    qio.log.heading("migrate, writing on the source while the migration is active")
    for vm in (src, dst):
        migration_caps(vm, events=True, dirty_bitmaps=capability)
    assert migrate(src, dst, f"unix:{sock}", max_bandwidth=THROTTLED) == "active"
    writes(src, NODE, DURING, 0x33)
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    migration_completed(src, dst)
    qio.show_bitmaps(dst, NODE, hashes=False)
    qio.check_live(dst, NODE)

    qio.log.heading("the destination runs on: its enabled bitmaps record")
    writes(dst, NODE, AFTER, 0x44)
    src.shutdown()
    dst.shutdown()

    qio.log.heading("a third VM on the image: the persistent bitmaps are back")
    after = vm_for(qio, "after", "disk.qcow2")
    after.launch()
    qio.show_bitmaps(after, NODE, hashes=False)


#: how a migration fails mid-way, and what the destination does then
FAILURES = ["cancel", "destination-killed"]


def start_throttled(qio: Case, src: VM, dst: VM, sock: str) -> None:
    """Capabilities on both sides, then a migration that stays active (throttled)."""
    for vm in (src, dst):
        migration_caps(vm, events=True, dirty_bitmaps=True)
    assert migrate(src, dst, sock, max_bandwidth=THROTTLED) == "active"


def fail_migration(qio: Case, src: VM, dst: VM, how: str) -> None:
    """End the active migration without a switchover; the source runs on."""
    if how == "cancel":
        src.qmp_log("migrate_cancel")
        assert wait_migration(src) == "cancelled"
        qio.log.log(f"dst: exited by itself with status {dst.wait_exit()}")
    else:
        dst.kill(signal.SIGKILL)
        qio.log.log("dst: killed with SIGKILL")
        assert wait_migration(src) == "failed"
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    assert src.qmp("query-status")["status"] == "running"


@pytest.mark.parametrize("how", FAILURES)
def test_failed_migration_keeps_source_bitmaps(qio: Case, how: str) -> None:
    """A full backup starts b0; the migration fails while writes land; b0 then serves
    the next incremental backup (restored and compared), and a second migration to a new
    destination carries it with every write since."""
    qio.img.create("disk.qcow2", SIZE)
    src = vm_for(qio, "src", "disk.qcow2")
    src.launch()
    chain = full_backup(qio, src, NODE, "disk.qcow2", SIZE,
                        bitmaps=[bitmap_add(NODE, "b0", 4096, persistent=True),
                                 bitmap_add(NODE, "t0", 65536)])
    writes(src, NODE, BEFORE, 0x11)

    qio.log.heading(f"a migration that fails: {how}")
    first = f"unix:{qio.sockdir / 'mig1.sock'}"
    dst = vm_for(qio, "dst", "disk.qcow2", incoming=first)
    dst.launch()
    start_throttled(qio, src, dst, first)
    writes(src, NODE, DURING, 0x22)
    fail_migration(qio, src, dst, how)
    qio.check_live(src, NODE)

    qio.log.heading("the source's b0 serves the next incremental backup")
    writes(src, NODE, WHILE_ENABLED, 0x33)
    chain = incremental_backup(qio, src, NODE, "disk.qcow2", SIZE, 1, chain)
    writes(src, NODE, AFTER, 0x44)

    qio.log.heading("a second migration, to a new destination, carries the bitmaps")
    second = f"unix:{qio.sockdir / 'mig2.sock'}"
    dst2 = vm_for(qio, "dst2", "disk.qcow2", incoming=second)
    dst2.launch()
    start_throttled(qio, src, dst2, second)
    writes(src, NODE, ((0x500000, 0x10000),), 0x55)
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    migration_completed(src, dst2)
    qio.show_bitmaps(dst2, NODE, hashes=False)
    incremental_backup(qio, dst2, NODE, "disk.qcow2", SIZE, 2, chain)


@pytest.mark.xfail(strict=False, raises=(OracleFailure, CommandError), reason=(
    "QEMU bug seen in 7.2.22 and 10.0.2: a migration with dirty-bitmaps sets skip_store "
    "on every bitmap it sends (init_dirty_bitmap_migration) and nothing clears it when the "
    "migration fails or is cancelled before the source's images are inactivated, so the "
    "source silently stops storing its persistent bitmaps: after its next clean quit the "
    "image has none, or only the in-use copy stored before, which loads inconsistent: "
    "either way no incremental backup can follow"))
@pytest.mark.parametrize("stored", [False, True], ids=["new", "stored-before"])
@pytest.mark.parametrize("how", FAILURES)
def test_failed_migration_then_quit(qio: Case, how: str, stored: bool) -> None:
    """The minimal case of the bug: a persistent bitmap (``stored-before``: in the image
    already, from a restart), a write, a failed migration, a clean quit; the image must
    hold the bitmap with the write, and after a restart it serves an incremental backup."""
    qio.img.create("disk.qcow2", SIZE)
    src = vm_for(qio, "src", "disk.qcow2")
    src.launch()
    src.qmp_log("block-dirty-bitmap-add", node=NODE, name="b0", persistent=True)
    if stored:
        src.restart()
    writes(src, NODE, BEFORE[:1], 0x11)
    sock = f"unix:{qio.sockdir / 'mig.sock'}"
    dst = vm_for(qio, "dst", "disk.qcow2", incoming=sock)
    dst.launch()
    start_throttled(qio, src, dst, sock)
    fail_migration(qio, src, dst, how)
    src.restart()
    target = add_target(qio, src, "inc.qcow2", SIZE)
    assert backup(src, "backup1", NODE, target, sync="incremental", bitmap="b0") is None


#: the same skip_store left set, seen by the next migration: QEMU sends a bitmap as
#: persistent only if bdrv_dirty_bitmap_get_persistence() says so, which is
#: "persistent && !skip_store"
RETRY_BUG = (
    "QEMU bug seen in 7.2.22 and 10.0.2: after a migration with dirty-bitmaps fails or is "
    "cancelled, skip_store stays set on the source's bitmaps (see "
    "test_failed_migration_then_quit), and bdrv_dirty_bitmap_get_persistence() reads "
    "'persistent && !skip_store', so the next migration, the retry, sends every persistent "
    "bitmap as transient: the destination has it transient and loses it when it quits "
    "(query-block still shows it persistent on the source). A backup job with the bitmap "
    "in between hides it: its successor starts with skip_store clear")


@pytest.mark.xfail(strict=False, raises=OracleFailure, reason=RETRY_BUG)
@pytest.mark.parametrize("how", FAILURES)
def test_failed_migration_then_retry(qio: Case, how: str) -> None:
    """The minimal case: a persistent bitmap, a write, a failed migration, then a retry to
    a new destination: there the bitmap must still be persistent (the oracle checks it
    live, then in the image after the destination quits)."""
    qio.img.create("disk.qcow2", SIZE)
    src = vm_for(qio, "src", "disk.qcow2")
    src.launch()
    src.qmp_log("block-dirty-bitmap-add", node=NODE, name="b0", persistent=True)
    writes(src, NODE, BEFORE[:1], 0x11)
    first = f"unix:{qio.sockdir / 'mig1.sock'}"
    dst = vm_for(qio, "dst", "disk.qcow2", incoming=first)
    dst.launch()
    start_throttled(qio, src, dst, first)
    fail_migration(qio, src, dst, how)
    second = f"unix:{qio.sockdir / 'mig2.sock'}"
    dst2 = vm_for(qio, "dst2", "disk.qcow2", incoming=second)
    dst2.launch()
    migration_caps(dst2, events=True, dirty_bitmaps=True)
    assert migrate(src, dst2, second, until=("completed",)) == "completed"
    assert wait_migration(dst2) == "completed"
    qio.show_bitmaps(dst2, NODE, hashes=False)
    qio.check_live(dst2, NODE)


# -- post-copy ------------------------------------------------------------------------------

#: a big sparse disk: the bitmaps of BITMAPS on it are what post-copy has left to send
#: (QEMU counts one pending byte per granule), far above what the downtime allows, so the
#: switch to post-copy happens before the bitmaps are sent, as upstream's
#: migrate-bitmaps-postcopy-test does with a 256 GiB disk
POSTCOPY_SIZE = 8 << 30
SHORT_DOWNTIME = 1  # ms: precopy alone would wait for the bitmaps to fit in it


def postcopy_caps(qio: Case, vm: VM, ram: bool) -> None:
    """dirty-bitmaps and events, with postcopy-ram too if ``ram``; skips (with QEMU's
    reason) when this QEMU or this host cannot do post-copy of RAM."""
    caps = {c["capability"] for c in vm.qmp("query-migrate-capabilities")}
    if ram and "postcopy-ram" not in caps:
        pytest.skip(f"QEMU {qio.probe.version} has no migration capability postcopy-ram")
    if ram:
        reply = vm.qmp_raw("migrate-set-capabilities", capabilities=[
            {"capability": "postcopy-ram", "state": True}])
        if "error" in reply:
            pytest.skip(f"post-copy of RAM is not possible here: {reply['error']['desc']}")
    migration_caps(vm, events=True, dirty_bitmaps=True, **({"postcopy_ram": True} if ram else {}))


@pytest.mark.requires(qmp=["migrate-start-postcopy"],
                      args=["migrate-set-parameters.max-postcopy-bandwidth",
                            "migrate-set-parameters.downtime-limit"])
@pytest.mark.parametrize("ram", [True, False], ids=["postcopy-ram", "bitmaps-only"])
def test_shared_storage_postcopy(qio: Case, ram: bool) -> None:
    """Writes on the source while pre-copy runs, then ``migrate-start-postcopy``: the
    destination runs while the bitmaps are still on the way (busy there, enabled ones
    recording into a nameless successor); its writes must end up in the enabled bitmaps,
    and the persistent ones in the image. ``bitmaps-only``: the dirty-bitmaps capability
    alone also enables the post-copy phase, for the bitmaps (RAM goes before the switch).
    The post-copy phase is throttled until the destination has written, so the bitmaps
    are still busy there whatever the machine's speed."""
    qio.img.create("disk.qcow2", POSTCOPY_SIZE)
    sock = qio.sockdir / "mig.sock"
    src = vm_for(qio, "src", "disk.qcow2")
    dst = vm_for(qio, "dst", "disk.qcow2", incoming="defer")
    src.launch()
    dst.launch()
    add_bitmaps(src)

    qio.log.heading("pre-copy, writing on the source, then the switch to post-copy")
    for vm in (src, dst):
        postcopy_caps(qio, vm, ram)
    assert migrate(src, dst, f"unix:{sock}", max_bandwidth=THROTTLED,
                   max_postcopy_bandwidth=THROTTLED,
                   downtime_limit=SHORT_DOWNTIME) == "active"
    writes(src, NODE, DURING, 0x33)
    src.qmp_log("migrate-start-postcopy")
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    assert wait_migration(src, until=("postcopy-active",)) == "postcopy-active"
    dst.event_wait("RESUME")
    qio.log.log("dst: RESUME")

    qio.log.heading("the destination runs while the bitmaps are still on the way")
    qio.show_bitmaps(dst, NODE, hashes=False)
    writes(dst, NODE, AFTER, 0x44)
    src.qmp_log("migrate-set-parameters", max_postcopy_bandwidth=RELEASED)
    migration_completed(src, dst)
    qio.show_bitmaps(dst, NODE, hashes=False)
    qio.check_live(dst, NODE)
    src.shutdown()
    dst.shutdown()

    qio.log.heading("a third VM on the image: the persistent bitmaps are back")
    after = vm_for(qio, "after", "disk.qcow2")
    after.launch()
    qio.show_bitmaps(after, NODE, hashes=False)


# -- storage migration: the destination's own image, filled by blockdev-mirror over NBD ----


def export_for_mirror(dst: VM, sock: str) -> None:
    """The destination's empty image, exported writable on its own NBD server (QEMU
    activates the node for the export, before the migration hands over)."""
    dst.qmp_log("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    if dst.has_command("block-export-add"):
        dst.qmp_log("block-export-add", type="nbd", id="mig0", node_name=NODE,
                    writable=True)
    else:
        dst.qmp_log("nbd-server-add", device=NODE, writable=True)


def needs_pause_before_switchover(qio: Case, vm: VM) -> None:
    caps = {c["capability"] for c in vm.qmp("query-migrate-capabilities")}
    if "pause-before-switchover" not in caps:
        pytest.skip(f"QEMU {qio.probe.version} has no capability pause-before-switchover")


def mirror_to(qio: Case, src: VM, dst: VM, n: int) -> None:
    """The destination exports its image on its own NBD server; the source adds an NBD
    node ``targetN`` on it and mirrors its disk there (``mirrorN``) until the job is
    ready: from then on every write through the device is copied as it lands."""
    qio.log.heading("the destination exports its image; the source mirrors into it")
    nbd = str(qio.sockdir / f"nbd{n}.sock")
    export_for_mirror(dst, nbd)
    src.qmp_log("blockdev-add", driver="nbd", node_name=f"target{n}",
                server={"type": "unix", "path": nbd}, export=NODE)
    src.qmp_log("blockdev-mirror", job_id=f"mirror{n}", device=NODE, target=f"target{n}",
                sync="full")
    src.event_wait("BLOCK_JOB_READY", match=lambda e: e["data"]["device"] == f"mirror{n}")
    qio.log.log(f"src: BLOCK_JOB_READY mirror{n}")


def start_storage_migration(qio: Case, src: VM, dst: VM, n: int) -> None:
    """``migrate`` with dirty-bitmaps, pausing before the switchover; throttled, so it
    stays active until the case releases it."""
    qio.log.heading("migrate; before the switchover the ready mirror is cancelled")
    migration_caps(src, events=True, dirty_bitmaps=True, pause_before_switchover=True)
    migration_caps(dst, events=True, dirty_bitmaps=True)
    mig = f"unix:{qio.sockdir / f'mig{n}.sock'}"
    assert migrate(src, dst, mig, max_bandwidth=THROTTLED) == "active"


def finish_storage_migration(qio: Case, src: VM, dst: VM, n: int) -> None:
    """At ``pre-switchover`` (the source stopped) the ready mirror is cancelled, as
    libvirt does: ``block-job-cancel`` ends it "completed" without switching, the target
    a point-in-time copy; then the migration goes on to the destination."""
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    assert wait_migration(src, until=("pre-switchover",)) == "pre-switchover"
    src.qmp_log("block-job-cancel", device=f"mirror{n}")
    assert src.run_job(f"mirror{n}") is None
    src.qmp_log("blockdev-del", node_name=f"target{n}")
    src.qmp_log("migrate-continue", state="pre-switchover")
    migration_completed(src, dst)
    dst.qmp_log("nbd-server-stop")


@pytest.mark.requires(qmp=["blockdev-mirror", "nbd-server-start", "block-job-cancel",
                           "migrate-continue"])
def test_storage_migration_mirror(qio: Case) -> None:
    """Non-shared storage, as libvirt migrates it: the destination exports its own empty
    image over NBD, the source mirrors its disk there (``sync=full``) and keeps mirroring
    writes once the job is ready; the migration (``dirty-bitmaps``) pauses before the
    switchover (``pause-before-switchover``), where the source, stopped, cancels the ready
    mirror (``block-job-cancel``: the job completes without switching, the target is a
    point-in-time copy) and then lets the migration finish. The bitmaps travel in the
    stream; the destination's image gets the persistent ones when it quits."""
    qio.img.create("src.qcow2", SIZE)
    qio.img.create("dst.qcow2", SIZE)
    src = vm_for(qio, "src", "src.qcow2", device=True)
    dst = vm_for(qio, "dst", "dst.qcow2", incoming="defer", device=True)
    src.launch()
    dst.launch()
    needs_pause_before_switchover(qio, src)
    add_bitmaps(src, device=True)
    mirror_to(qio, src, dst, 1)
    guest_writes(src, DURING, 0x33)  # through the mirror's filter: copied to the target
    start_storage_migration(qio, src, dst, 1)
    guest_writes(src, ((0x500000, 0x10000),), 0x55)  # mirrored, and in the bitmaps
    finish_storage_migration(qio, src, dst, 1)
    qio.img.run("compare", "-U", "src.qcow2", "dst.qcow2", log=True)
    qio.show_bitmaps(dst, NODE, hashes=False)
    qio.check_live(dst, NODE)

    qio.log.heading("the destination runs on; then its image holds the persistent bitmaps")
    guest_writes(dst, AFTER, 0x44)
    src.shutdown()
    dst.shutdown()
    qio.show_image_bitmaps("src.qcow2")
    after = vm_for(qio, "after", "dst.qcow2")
    after.launch()
    qio.show_bitmaps(after, NODE, hashes=False)


@pytest.mark.xfail(strict=False, raises=OracleFailure, reason=RETRY_BUG)
@pytest.mark.requires(qmp=["blockdev-mirror", "nbd-server-start", "block-job-cancel",
                           "migrate-continue"])
def test_storage_migration_destination_killed(qio: Case) -> None:
    """The destination dies (SIGKILL) while the mirror is ready and the migration
    active. The migration fails; the mirror fails too, at the next write it must copy
    (its target is gone), and its NBD node is removed. The source runs on with all its
    bitmaps, the write included, and a retry to a new destination (its own new image)
    carries them: a QEMU bug makes the persistent ones arrive transient
    (``test_failed_migration_then_retry`` is the minimal case)."""
    for image in ("src.qcow2", "dst1.qcow2", "dst2.qcow2"):
        qio.img.create(image, SIZE)
    src = vm_for(qio, "src", "src.qcow2", device=True)
    dst = vm_for(qio, "dst", "dst1.qcow2", incoming="defer", device=True)
    src.launch()
    dst.launch()
    needs_pause_before_switchover(qio, src)
    add_bitmaps(src, device=True)
    mirror_to(qio, src, dst, 1)
    start_storage_migration(qio, src, dst, 1)
    guest_writes(src, DURING, 0x33)
    dst.kill(signal.SIGKILL)
    qio.log.log("dst: killed with SIGKILL")
    assert wait_migration(src) == "failed"
    guest_writes(src, ((0x500000, 0x10000),), 0x55)  # the mirror cannot copy it
    assert src.run_job("mirror1", log=False) is not None
    qio.log.log("src: job mirror1 failed")
    src.qmp_log("blockdev-del", node_name="target1")
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    assert src.qmp("query-status")["status"] == "running"
    qio.check_live(src, NODE)

    qio.log.heading("a retry, to a new destination with its own image")
    dst2 = vm_for(qio, "dst2", "dst2.qcow2", incoming="defer", device=True)
    dst2.launch()
    mirror_to(qio, src, dst2, 2)
    start_storage_migration(qio, src, dst2, 2)
    finish_storage_migration(qio, src, dst2, 2)
    qio.img.run("compare", "-U", "src.qcow2", "dst2.qcow2", log=True)
    qio.show_bitmaps(dst2, NODE, hashes=False)
    guest_writes(dst2, AFTER, 0x44)


# -- block-bitmap-mapping: aliases on the wire, renames, bitmaps that stay home ------------

OTHER = "other0"
#: the source sends two of BITMAPS under aliases, one made persistent on the way
SRC_MAP = [{"node-name": NODE, "alias": "disk", "bitmaps": [
    {"name": "persistent-on", "alias": "pon"},
    {"name": "transient-on", "alias": "ton", "transform": {"persistent": True}}]}]
#: the destination's node has another name; one bitmap arrives under a new name
DST_MAP = [{"node-name": OTHER, "alias": "disk", "bitmaps": [
    {"name": "renamed-on", "alias": "pon"},
    {"name": "transient-on", "alias": "ton"}]}]


@pytest.mark.requires(args=["migrate-set-parameters.block-bitmap-mapping.bitmaps.transform"])
def test_bitmap_mapping_aliases(qio: Case) -> None:
    """Shared storage, the destination's node named differently: a ``block-bitmap-mapping``
    on each side maps both to the alias "disk". Listed bitmaps travel under their aliases
    (``persistent-on`` arrives as ``renamed-on``; ``transient-on`` arrives persistent, by
    the source's ``transform``); the unlisted ones stay home: the source stores
    ``persistent-off`` in the image when it lets go of it, and the destination loads it
    from there; ``transient-off`` is gone."""
    qio.img.create("disk.qcow2", SIZE)
    sock = qio.sockdir / "mig.sock"
    src = vm_for(qio, "src", "disk.qcow2")
    dst = vm_for(qio, "dst", "disk.qcow2", incoming="defer", node=OTHER)
    src.launch()
    dst.launch()
    add_bitmaps(src)

    qio.log.heading("migrate with a mapping on each side")
    for vm, mapping in ((src, SRC_MAP), (dst, DST_MAP)):
        migration_caps(vm, events=True, dirty_bitmaps=True)
        vm.qmp_log("migrate-set-parameters", block_bitmap_mapping=mapping)
    assert migrate(src, dst, f"unix:{sock}", max_bandwidth=THROTTLED) == "active"
    writes(src, NODE, DURING, 0x33)
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    migration_completed(src, dst)
    qio.show_bitmaps(dst, OTHER, hashes=False)
    qio.check_live(dst, OTHER)

    qio.log.heading("the destination runs on; a third VM finds the persistent ones")
    writes(dst, OTHER, AFTER, 0x44)
    src.shutdown()
    dst.shutdown()
    after = vm_for(qio, "after", "disk.qcow2")
    after.launch()
    qio.show_bitmaps(after, NODE, hashes=False)


def into_bitmap_postcopy(qio: Case, dies: str) -> tuple[VM, VM]:
    """A source and a destination in post-copy of the bitmaps alone (throttled, so they
    are still on the way), the guest already running and written on the destination: the
    point where the killed-side cases part. `dies` names the side, for the log."""
    qio.img.create("disk.qcow2", POSTCOPY_SIZE)
    sock = qio.sockdir / "mig.sock"
    src = vm_for(qio, "src", "disk.qcow2")
    dst = vm_for(qio, "dst", "disk.qcow2", incoming="defer")
    src.launch()
    dst.launch()
    add_bitmaps(src)

    qio.log.heading(f"post-copy of the bitmaps; the {dies} dies on the way")
    for vm in (src, dst):
        postcopy_caps(qio, vm, ram=False)
    migrate(src, dst, f"unix:{sock}", until=None, max_postcopy_bandwidth=THROTTLED,
            downtime_limit=SHORT_DOWNTIME)
    src.qmp_log("migrate-start-postcopy")
    assert wait_migration(src, until=("postcopy-active",)) == "postcopy-active"
    dst.event_wait("RESUME")
    qio.log.log("dst: RESUME")
    writes(dst, NODE, AFTER, 0x44)
    return src, dst


@pytest.mark.requires(qmp=["migrate-start-postcopy"],
                      args=["migrate-set-parameters.max-postcopy-bandwidth",
                            "migrate-set-parameters.downtime-limit"])
def test_postcopy_source_killed(qio: Case) -> None:
    """Post-copy of the bitmaps alone, the source SIGKILLed while they are on the way: the
    destination has all of the VM and runs on, but drops every bitmap still unfinished
    (all of them: their COMPLETE chunks come last) and still reports ``completed``
    (QEMU: "All states are migrated except dirty bitmaps"). Nothing was stored: the
    image has no bitmaps. A new bitmap on the destination works as usual."""
    src, dst = into_bitmap_postcopy(qio, dies="source")
    src.kill(signal.SIGKILL)
    qio.log.log("src: killed with SIGKILL")
    assert wait_migration(dst) == "completed"
    qio.show_bitmaps(dst, NODE, hashes=False)
    assert dst.qmp("query-status")["status"] == "running"

    qio.log.heading("the destination runs on; a new bitmap records as usual")
    dst.qmp_log("block-dirty-bitmap-add", node=NODE, name="fresh", persistent=True)
    writes(dst, NODE, DURING, 0x55)
    dst.shutdown()
    qio.show_image_bitmaps("disk.qcow2")


@pytest.mark.requires(qmp=["migrate-start-postcopy"],
                      args=["migrate-set-parameters.max-postcopy-bandwidth",
                            "migrate-set-parameters.downtime-limit"])
def test_postcopy_destination_killed(qio: Case) -> None:
    """Post-copy of the bitmaps alone, the destination SIGKILLed while they are on the
    way: the source waits in ``postcopy-paused`` for a recovery that cannot come (the guest
    ran on the destination; the source's RAM and disks are stale). What must hold: the
    source still has every bitmap as it sent it, and its images stay handed over, so when
    it quits it stores nothing: the image has no bitmaps (none was stored before), not a
    stale copy that would load as valid."""
    src, dst = into_bitmap_postcopy(qio, dies="destination")
    dst.kill(signal.SIGKILL)
    qio.log.log("dst: killed with SIGKILL")
    assert wait_migration(src, until=("postcopy-paused",)) == "postcopy-paused"
    kept = qio.show_bitmaps(src, NODE, hashes=False)
    assert {b.name for b in kept} == {b[0] for b in BITMAPS}, "the source lost bitmaps"
    assert all(b.busy for b in kept), "a bitmap still on the way is usable on the source"
    src.shutdown()
    qio.show_image_bitmaps("disk.qcow2")


# -- a real Linux guest writes while it migrates ----------------------------------------------


@pytest.mark.guest
@pytest.mark.requires(qmp=["migrate-start-postcopy"],
                      args=["migrate-set-parameters.max-postcopy-bandwidth",
                            "migrate-set-parameters.downtime-limit"])
@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy-bitmaps"])
def test_guest_writes_while_migrating(qio: Case, postcopy: bool) -> None:
    """A booted Linux guest writes with ``dd oflag=direct`` through its virtio-blk disk:
    before the migration, while the pre-copy migration is active (throttled), and on the
    destination once the guest has moved there (``postcopy-bitmaps``: while its bitmaps
    are still on the way, the dirty-bitmaps capability alone, so the guest's RAM is all
    there). The guest reads its writes back on the destination."""
    size = POSTCOPY_SIZE if postcopy else SIZE
    qio.img.create("disk.qcow2", size)
    mig = f"unix:{qio.sockdir / 'mig.sock'}"
    src = vm_for(qio, "src", "disk.qcow2", guest=True)
    dst = vm_for(qio, "dst", "disk.qcow2", incoming=mig, guest=True)
    src.launch()
    dst.launch()
    for name, gran, persistent, _ in BITMAPS:
        src.qmp_log("block-dirty-bitmap-add", node=NODE, name=name, granularity=gran,
                    persistent=persistent)
    src.guest.write(0, 0x10000, 0x11)
    src.guest.write(0xA0200, 0x1000, 0x11)
    for name, _, _, enabled in BITMAPS:
        if not enabled:
            src.qmp_log("block-dirty-bitmap-disable", node=NODE, name=name)

    qio.log.heading("the guest writes while the migration is active")
    for vm in (src, dst):
        migration_caps(vm, events=True, dirty_bitmaps=True)
    assert migrate(src, dst, mig, max_bandwidth=THROTTLED,
                   max_postcopy_bandwidth=THROTTLED, downtime_limit=10) == "active"
    src.guest.write(0x400000, 0x1000, 0x33)
    src.guest.write(0x7FFE00, 0x400, 0x33)
    if postcopy:
        src.qmp_log("migrate-start-postcopy")
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)

    qio.log.heading("the guest runs on the destination")
    if postcopy:
        assert wait_migration(src, until=("postcopy-active",)) == "postcopy-active"
        dst.event_wait("RESUME")
        dst.guest.continues_from(src.guest)
        qio.show_bitmaps(dst, NODE, hashes=False)
        dst.guest.write(0x200000, 0x20000, 0x44)  # the bitmaps are still on the way
        src.qmp_log("migrate-set-parameters", max_postcopy_bandwidth=RELEASED)
    migration_completed(src, dst)
    if not postcopy:
        dst.guest.continues_from(src.guest)
        qio.check_live(dst, NODE)
        dst.guest.write(0x200000, 0x20000, 0x44)
    qio.show_bitmaps(dst, NODE, hashes=False)
    dst.guest.checksum(0x400000, 0x1000)
    dst.guest.checksum(0x200000, 0x20000)
    src.shutdown()
    dst.shutdown()
