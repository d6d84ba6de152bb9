"""The data side of backups: point-in-time references, backup chains, restores.

Bitmap counts can look right while a backup is useless; the only proof is a restore. A
case captures the source's content at the moment a backup starts (a *reference*), keeps
its backups as a chain of qcow2 images (a full backup, then incrementals whose backing
file is the previous backup, so an incremental allocates only the clusters the job
copied), flattens the chain the way a restore would, and compares the result with the
reference. One transcript line per check; a mismatch raises :class:`RestoreMismatch`
naming the chain and the first differing offsets.

The reference is ``qemu-img convert -U`` of the source image right after a ``flush`` of
the source node, with no guest write in between. That is exact (the flush puts the
qcow2 metadata on disk, and nothing changes the image until the job starts) and it is
independent of the code under test: a ``blockdev-backup sync=full`` reference would use
the same copy-before-write and block-copy code as the backups it is meant to judge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import HarnessError, RestoreMismatch
from harness.filters import TextFilter
from harness.model import Extents, format_ranges
from harness.tools import QemuImg, QemuIO
from harness.transcript import Transcript
from harness.vm import VM

if TYPE_CHECKING:
    from harness.oracle import Oracle

SECTOR = 512


class Case(Protocol):
    """What these helpers use of a case context (``harness.session.Case`` has it): the
    scratch dir, the tools, the transcript. Any object with these works."""

    scratch: Path
    img: QemuImg
    io: QemuIO
    log: Transcript
    oracle: Oracle


@dataclass(frozen=True)
class Reference:
    """The source's content at the start of backup ``n``, as a qcow2 image."""

    n: int
    image: str

    @property
    def label(self) -> str:
        return f"the source at backup {self.n}"


@dataclass(frozen=True)
class Chain:
    """Backup images, the full backup first; each later image's backing file is the one
    before it. ``partial`` names images a failed job left (kept on purpose by the case)."""

    images: tuple[str, ...]
    partial: frozenset[str] = frozenset()

    @property
    def top(self) -> str:
        return self.images[-1]

    def then(self, image: str, partial: bool = False) -> Chain:
        return Chain((*self.images, image),
                     self.partial | {image} if partial else self.partial)

    def describe(self) -> str:
        """``full <- inc1 <- inc2`` (image names without ``.qcow2``; partial marked)."""
        return " <- ".join(Path(i).stem + (" (partial)" if i in self.partial else "")
                           for i in self.images)


def reference(qio: Case, vm: VM, node: str, image: str, n: int) -> Reference:
    """Capture the source's content now: flush ``node``, then copy its image file.

    Call it right before starting backup ``n``, with no write in between. ``-U`` reads
    the image QEMU has open; the flush is what makes that read consistent (without it,
    new clusters' L2 entries may still sit in QEMU's metadata cache).
    """
    vm.qemu_io(node, "flush")
    name = f"ref-{n}.qcow2"
    qio.img.run("convert", "-U", "-O", "qcow2", image, name)
    qio.log.log(f"reference {n}: {Path(image).name} flushed and copied to {name}")
    return Reference(n, name)


def create_target(img: QemuImg, image: str, size: int, backing: str | None = None) -> Path:
    """A backup target: a fresh qcow2, or an incremental over ``backing`` (the previous
    backup), so that reading it through its chain gives the restored disk."""
    return img.create(image, size, backing=backing)


def target_node(path: str | Path, node: str,
                inject: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``blockdev-add`` options for a target: qcow2 over the file, or over a ``blkdebug``
    with ``inject`` rules. The backing file is not opened (``backing: null``): the job
    writes whole clusters, and leaving the previous backup closed means it can be checked
    or restored while this one is written."""
    file: dict[str, Any] = {"driver": "file", "filename": str(path)}
    if inject:
        file = {"driver": "blkdebug", "image": file, "inject-error": list(inject)}
    return {"driver": "qcow2", "node-name": node, "backing": None, "file": file}


def host_offset(img: QemuImg, image: str | Path, guest_offset: int) -> int:
    """Where in the image *file* the data of ``guest_offset`` lives (for a blkdebug rule
    on the file node). The image may be open in QEMU: flush it first."""
    for e in img.json("map", "-U", str(image)):
        start, length = int(e["start"]), int(e["length"])
        if start <= guest_offset < start + length:
            if not e.get("data") or "offset" not in e or e.get("depth", 0) != 0:
                break
            return int(e["offset"]) + guest_offset - start
    raise HarnessError(f"{Path(image).name}: guest offset {guest_offset:#x} has no data "
                       "cluster in this layer (flush the node before mapping it)")


def received(img: QemuImg, image: str | Path, force_share: bool = False) -> Extents:
    """The guest ranges a backup target holds in its own layer (data or zero clusters),
    i.e. what a job wrote into it; reads elsewhere fall through to the backing chain.
    ``force_share`` reads an image QEMU still has open (flush it first)."""
    out = Extents()
    for e in img.json("map", *(["-U"] if force_share else []), str(image)):
        if e.get("depth", 0) == 0 and e.get("present", e.get("data", False)):
            out.add(int(e["start"]), int(e["length"]))
    return out


# -- restore checks --------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """``qemu-img compare`` of a restored image with a reference."""

    identical: bool
    first_offset: int | None
    differing: Extents


_MISMATCH = re.compile(r"Content mismatch at offset (\d+)!")


def compare(img: QemuImg, restored: str, ref: str) -> Comparison:
    """Compare two images by content; on a mismatch also list every differing range
    (sector resolution, from raw copies), since qemu-img names only the first."""
    res = img.run("compare", restored, ref, check=False)
    if res.status == 0:
        return Comparison(True, None, Extents())
    if res.status != 1:
        raise HarnessError(f"qemu-img compare {restored} {ref} could not compare (exit "
                           f"{res.status}): {(res.stderr or res.stdout).strip()}")
    m = _MISMATCH.search(res.stdout + res.stderr)
    first = int(m.group(1)) if m else None
    return Comparison(False, first, _differing(img, restored, ref))


def _differing(img: QemuImg, a: str, b: str) -> Extents:
    raws = []
    for name in (a, b):
        raw = f"{Path(name).stem}.raw"
        img.run("convert", "-O", "raw", name, raw)
        raws.append((img.scratch / raw).read_bytes())
    out = Extents()
    for off in range(0, max(len(raws[0]), len(raws[1])), SECTOR):
        if raws[0][off:off + SECTOR] != raws[1][off:off + SECTOR]:
            out.add(off, SECTOR)
    for name in (a, b):
        (img.scratch / f"{Path(name).stem}.raw").unlink(missing_ok=True)
    return out


def restore(qio: Case, chain: Chain, label: str) -> str:
    """Flatten the chain into ``restore-<label>.qcow2``, as restoring it would."""
    out = f"restore-{label}.qcow2"
    qio.img.run("convert", "-O", "qcow2", chain.top, out)
    return out


def verify_restore(qio: Case, chain: Chain, ref: Reference, label: str) -> None:
    """Restore ``chain`` and require it to equal ``ref``; log one line either way."""
    restored = restore(qio, chain, label)
    cmp = compare(qio.img, restored, ref.image)
    what = f"restore {label} ({chain.describe()})"
    if cmp.identical:
        qio.log.log(f"{what}: identical to {ref.label}")
        return
    first = f"{cmp.first_offset:#x}" if cmp.first_offset is not None else "?"
    qio.log.log(f"{what}: DIFFERS from {ref.label}, first at offset {first}")
    raise RestoreMismatch(
        f"{what} differs from {ref.label} ({ref.image}): qemu-img compare says content "
        f"mismatch at offset {first}; differing ranges {format_ranges(cmp.differing)} "
        f"({cmp.differing.total()} bytes); chain {' <- '.join(chain.images)}")


def expect_incomplete(qio: Case, chain: Chain, ref: Reference, label: str) -> None:
    """A backup whose job did not finish must not restore to the reference: log that it
    differs (without offsets, which depend on how far the job got) or raise."""
    restored = restore(qio, chain, label)
    cmp = compare(qio.img, restored, ref.image)
    what = f"restore {label} ({chain.describe()})"
    if cmp.identical:
        raise RestoreMismatch(f"{what} is identical to {ref.label} although its job did "
                              "not finish: the test cannot tell a partial backup from a "
                              "complete one (choose writes the full backup lacks)")
    qio.log.log(f"{what}: differs from {ref.label}, as an unfinished backup must")


_FAILED_JOB_OFFSET = re.compile(
    r'^(?P<head>.*\{"event": "BLOCK_JOB_COMPLETED", "data": \{.*"error": .*"offset": )\d+',
    re.M)


def failed_job_progress(text: str) -> str:
    """The ``offset`` (progress) of a BLOCK_JOB_COMPLETED that carries an ``error``.

    How far a failed job got depends on which of its parallel copies were done when the
    failure was noticed; the error itself, ``len`` and the bitmap left behind are checked.
    """
    return _FAILED_JOB_OFFSET.sub(r"\g<head>" + '"PROGRESS"', text)


def completed_job_size(job_id: str) -> TextFilter:
    """A filter for the size of one job that finished everything it was given.

    After a failure under ``bitmap-mode=always`` the next backup's size is whatever the
    failed one left behind, which depends on copy order like the failure itself. Only
    ``len`` and ``offset`` of that job's BLOCK_JOB_COMPLETED are replaced, and only when
    they are equal, so a job that stopped short would still show both numbers.
    """
    pattern = re.compile(
        r'(\{"event": "BLOCK_JOB_COMPLETED", "data": \{"device": '
        + re.escape(f'"{job_id}"')
        + r', "len": )(\d+)(, "offset": )\2\b')

    def replace_completed_job_size(text: str) -> str:
        return pattern.sub(r'\1"SIZE"\3"SIZE"', text)

    return replace_completed_job_size


# -- pull mode: a point-in-time view exported over NBD ----------------------------------


@dataclass(frozen=True)
class NbdExport:
    """An NBD export of a VM's own NBD server on a unix socket, as a backup client sees it."""

    socket: Path
    name: str

    def image_opts(self, bitmap: str | None = None, prefix: str = "") -> str:
        """``--image-opts`` for the nbd driver; with ``bitmap``, block status reports that
        dirty bitmap (``x-dirty-bitmap``, dirty = ``"data": false``) instead of allocation.
        ``prefix`` nests the options under a parent (``file.`` below a raw slice)."""
        opts = [f"{prefix}driver=nbd", f"{prefix}server.type=unix",
                f"{prefix}server.path={self.socket}", f"{prefix}export={self.name}"]
        if bitmap is not None:
            opts.append(f"{prefix}x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
        return ",".join(opts)


def nbd_server_start(vm: VM, socket: Path) -> None:
    """``nbd-server-start`` on a unix socket (logged)."""
    vm.qmp_log("nbd-server-start", addr={"type": "unix", "data": {"path": str(socket)}})


def nbd_export_add(vm: VM, node: str, name: str, socket: Path,
                   bitmap: str | dict[str, str] | None = None) -> NbdExport:
    """Export ``node`` read-only as ``name``, with ``bitmap`` (a disabled bitmap, by name
    or as ``{"node", "name"}``) as the meta context ``qemu:dirty-bitmap:NAME``.

    ``block-export-add`` where QEMU has it, else ``nbd-server-add`` (which names a bitmap
    only by name). Logged.
    """
    if vm.has_command("block-export-add"):
        args: dict[str, Any] = {"type": "nbd", "id": name, "name": name, "node-name": node}
        if bitmap is not None:
            args["bitmaps"] = [bitmap]
        vm.qmp_log("block-export-add", args)
    else:
        if isinstance(bitmap, dict):
            raise HarnessError(f"vm {vm.name!r} has no block-export-add: nbd-server-add "
                               "names a bitmap only by name")
        extra = {} if bitmap is None else {"bitmap": bitmap}
        vm.qmp_log("nbd-server-add", {"device": node, "name": name, **extra})
    return NbdExport(socket, name)


def nbd_export_del(vm: VM, export: NbdExport) -> None:
    """Remove the export (``block-export-del`` and its BLOCK_EXPORT_DELETED event, or
    ``nbd-server-remove``), logged."""
    if vm.has_command("block-export-del"):
        vm.qmp_log("block-export-del", id=export.name)
        ev = vm.event_wait("BLOCK_EXPORT_DELETED", timeout=10.0,
                           match=lambda e: bool(e["data"].get("id") == export.name))
        if vm.transcript is not None:
            vm.transcript.event(ev, vm.log_prefix)
    else:
        vm.qmp_log("nbd-server-remove", name=export.name)


def dirty_extents(img: QemuImg, export: NbdExport, bitmap: str,
                  window: tuple[int, int] | None = None) -> Extents:
    """The dirty extents of an exported bitmap, read the way a backup client reads them:
    ``qemu-img map`` over NBD with ``x-dirty-bitmap``, where ``"data": false`` means
    dirty (the client reports the bitmap's bits in place of allocation). ``window``
    (offset, length): only that part (``--start-offset``, ``--max-length``)."""
    out = Extents()
    part = [] if window is None else [f"--start-offset={window[0]}",
                                      f"--max-length={window[1]}"]
    for e in img.json("map", *part, "--image-opts", export.image_opts(bitmap)):
        if not e["data"]:
            out.add(int(e["start"]), int(e["length"]))
    return out


def copy_extents(qio: Case, export: NbdExport, extents: Extents, target: str) -> None:
    """Copy exactly ``extents`` of the export into the qcow2 image ``target`` (whose
    backing file is the previous backup), as a pull-mode backup client does.

    Each extent is read over NBD by ``qemu-img convert`` of a raw slice of the export
    (the raw driver's ``offset`` and ``size`` over the nbd driver) into a temporary raw
    file, and written at its offset with ``qemu-io -c "write -s FILE OFF LEN"``, all
    writes in one qemu-io run. Nothing outside the extents is read or written, and a
    dirty extent that reads as zeroes is written as data, so it still hides the older
    data of the backing file. ``qemu-img dd`` is not used: it counts ``count`` from the
    start of the input, not from ``skip`` (``skip=4 count=1`` prints "cannot skip to
    specified offset", writes an empty file and still exits 0; QEMU 7.2 and 10.0), and
    it cannot write at an offset of an existing image. One line goes to the transcript.
    """
    commands = []
    temps = []
    for i, (off, length) in enumerate(extents):
        raw = f"{Path(target).stem}-extent{i}.raw"
        slice_opts = (f"driver=raw,offset={off},size={length},"
                      + export.image_opts(prefix="file."))
        qio.img.run("convert", "--image-opts", slice_opts, "-O", "raw", raw)
        temps.append(qio.scratch / raw)
        commands.append(f"write -s {raw} {off:#x} {length:#x}")
    if commands:
        qio.io.io(target, *commands)
    for t in temps:
        t.unlink(missing_ok=True)
    qio.log.log(f"copied {len(extents)} extent(s), {extents.total():#x} bytes, from export "
                f"{export.name!r} into {Path(target).name}")


def copy_whole_export(qio: Case, export: NbdExport, target: str) -> None:
    """A full backup over NBD: ``qemu-img convert`` of the whole export into ``target``."""
    qio.img.run("convert", "--image-opts", export.image_opts(), "-O", "qcow2", target)
    qio.log.log(f"copied the whole export {export.name!r} into {Path(target).name}")


def compare_export(qio: Case, export: NbdExport, ref: Reference,
                   window: tuple[int, int] | None = None) -> Comparison:
    """Compare what the export shows now with a reference image, by content: the whole
    disk, or only ``window`` (offset, length: a raw slice of both; a mismatch's offset is
    then relative to the window's start)."""
    export_opts = export.image_opts()
    ref_opts = f"driver=qcow2,file.driver=file,file.filename={ref.image}"
    if window is not None:
        cut = f"driver=raw,offset={window[0]},size={window[1]},"
        export_opts = cut + export.image_opts(prefix="file.")
        ref_opts = cut + ",".join(f"file.{o}" for o in ref_opts.split(","))
    res = qio.img.run("compare", "--image-opts", export_opts, ref_opts, check=False)
    if res.status == 0:
        return Comparison(True, None, Extents())
    if res.status != 1:
        raise HarnessError(f"qemu-img compare of export {export.name!r} with {ref.image} "
                           f"could not compare (exit {res.status}): "
                           f"{(res.stderr or res.stdout).strip()}")
    m = _MISMATCH.search(res.stdout + res.stderr)
    return Comparison(False, int(m.group(1)) if m else None, Extents())
