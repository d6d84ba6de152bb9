"""Dirty bitmaps as QEMU shows them: live over QMP, and offline through ``qemu-img info``.

The transcript format is one line per bitmap with fields in a fixed order, so golden files
read the same on every QEMU version (fields a version lacks are shown with their meaning,
e.g. ``inconsistent`` absent means false). Hashes from ``x-debug-block-dirty-bitmap-sha256``
are shown as labels (``H1``, ``H2``...) numbered by first appearance in the test: equal
hashes get equal labels, and nothing in a golden file depends on QEMU's hash layout.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import CommandError, HarnessError
from harness.machine import Machine
from harness.tools import QemuImg


@dataclass(frozen=True)
class LiveBitmap:
    """One bitmap as ``query-named-block-nodes`` reports it."""

    name: str
    count: int
    granularity: int
    persistent: bool
    recording: bool
    busy: bool
    inconsistent: bool

    def describe(self) -> str:
        flags = [f for f in ("persistent", "recording", "busy", "inconsistent") if getattr(self, f)]
        # a bitmap without a name is QEMU's own: the successor of a busy bitmap (a backup
        # job's, an incoming migration's) that records the writes made meanwhile
        name = self.name or "(no name: a successor)"
        return (f"{name}: count={self.count} granularity={self.granularity} "
                f"[{' '.join(flags) or '-'}]")


def node_info(vm: Machine, node: str) -> dict[str, Any]:
    """The ``query-named-block-nodes`` entry of ``node``."""
    for entry in vm.qmp("query-named-block-nodes"):
        if entry.get("node-name") == node:
            return dict(entry)
    raise HarnessError(f"vm {vm.name!r} has no block node named {node!r}")


def live_bitmaps(vm: Machine, node: str) -> list[LiveBitmap]:
    """The node's bitmaps, sorted by name."""
    out = []
    for b in node_info(vm, node).get("dirty-bitmaps", []):
        out.append(LiveBitmap(
            name=b.get("name", ""),
            count=int(b["count"]),
            granularity=int(b["granularity"]),
            persistent=bool(b.get("persistent", False)),
            recording=bool(b.get("recording", b.get("status") == "active")),
            busy=bool(b.get("busy", b.get("status") == "locked")),
            inconsistent=bool(b.get("inconsistent", False)),
        ))
    return sorted(out, key=lambda b: b.name)


def live_bitmap(vm: Machine, node: str, name: str) -> LiveBitmap:
    for b in live_bitmaps(vm, node):
        if b.name == name:
            return b
    raise HarnessError(f"vm {vm.name!r}: node {node!r} has no bitmap {name!r}")


def sha256(vm: Machine, node: str, name: str) -> str:
    """QEMU's hash of a bitmap (``x-debug-block-dirty-bitmap-sha256``)."""
    return str(vm.qmp("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"])


@dataclass(frozen=True)
class ImageBitmap:
    """One bitmap as ``qemu-img info`` reports it from the qcow2 header."""

    name: str
    granularity: int
    flags: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.name}: granularity={self.granularity} flags=[{', '.join(self.flags)}]"

    @property
    def in_use(self) -> bool:
        return "in-use" in self.flags


def image_bitmaps(img: QemuImg, path: str | Path, force_share: bool = False) -> list[ImageBitmap]:
    """The image's bitmaps from ``qemu-img info``, sorted by name."""
    return sorted(
        (ImageBitmap(b["name"], int(b["granularity"]), tuple(b.get("flags", [])))
         for b in img.bitmaps(path, force_share=force_share)),
        key=lambda b: b.name,
    )


class HashLabels:
    """Stable labels for hashes: the first hash seen is H1, the next new one H2 (another
    ``prefix`` for another kind of hash: a guest's data checksums are D1, D2...)."""

    def __init__(self, prefix: str = "H") -> None:
        self._labels: dict[str, str] = {}
        self.prefix = prefix

    def __call__(self, digest: str) -> str:
        if digest not in self._labels:
            self._labels[digest] = f"{self.prefix}{len(self._labels) + 1}"
        return self._labels[digest]


def ranges_sha256(ranges: list[tuple[int, int]], granularity: int, size: int) -> str:
    """What ``x-debug-block-dirty-bitmap-sha256`` must say for these dirty ranges.

    QEMU hashes the last level of its HBitmap: one bit per granule, packed into 64-bit
    little-endian words (``unsigned long`` on x86_64), ceil(granules / 64) words. Computing
    it from the NBD view makes the hash a third, independent witness of the same bits.
    """
    granules = -(-size // granularity)
    words = [0] * (-(-granules // 64))
    for off, length in ranges:
        for g in range(off // granularity, -(-(off + length) // granularity)):
            words[g // 64] |= 1 << (g % 64)
    return hashlib.sha256(b"".join(struct.pack("<Q", w) for w in words)).hexdigest()


def ranges_count(ranges: list[tuple[int, int]], granularity: int) -> int:
    """QEMU's ``count`` for these ranges: dirty granules times the granularity."""
    granules: set[int] = set()
    for off, length in ranges:
        granules.update(range(off // granularity, -(-(off + length) // granularity)))
    return len(granules) * granularity


VIEW_BITMAP = "qiotests-view"
VIEW_EXPORT = "qiotests-view"


def live_ranges(vm: Machine, node: str, name: str, img: QemuImg,
                nbd_socket: str | None = None) -> list[tuple[int, int]]:
    """The exact dirty ranges of a live bitmap, read over NBD the way backup tools do.

    The bitmap is copied into a disabled temporary bitmap (an enabled one cannot be
    exported read-only), the node is exported with that copy over the VM's own NBD server
    on a unix socket (``nbd_socket``: the one the case already started, else a server of
    our own), and ``qemu-img map`` reads ``qemu:dirty-bitmap:`` (it reports dirty extents
    as ``"data": false``). Everything temporary is removed again; the bitmap under test
    is only read. These are the harness's own commands: they go straight to the QMP
    channel, so the oracle does not follow them as the case's.
    """
    gran = live_bitmap(vm, node, name).granularity
    sock = nbd_socket or str(vm.socket_path.parent / f"{vm.name}-view.nbd")
    _ok(vm, "block-dirty-bitmap-add", node=node, name=VIEW_BITMAP, granularity=gran,
        disabled=True)
    try:
        _ok(vm, "block-dirty-bitmap-merge", node=node, target=VIEW_BITMAP, bitmaps=[name])
        if nbd_socket is None:
            _ok(vm, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        try:
            _export(vm, node, VIEW_EXPORT)
            try:
                opts = (f"driver=nbd,server.type=unix,server.path={sock},"
                        f"export={VIEW_EXPORT},x-dirty-bitmap=qemu:dirty-bitmap:{VIEW_BITMAP}")
                extents = img.json("map", "--image-opts", opts)
            finally:
                if nbd_socket is not None and vm.channel_usable:
                    _unexport(vm)
        finally:
            if nbd_socket is None:
                vm.undo("nbd-server-stop")
    finally:
        vm.undo("block-dirty-bitmap-remove", node=node, name=VIEW_BITMAP)
    return [(int(e["start"]), int(e["length"])) for e in extents if not e["data"]]


def _ok(vm: Machine, cmd: str, **args: Any) -> Any:
    """One of the view's own commands on the raw channel; an error reply raises."""
    args = {k.replace("_", "-"): v for k, v in args.items()}
    reply = vm.execute(cmd, args)
    if "error" in reply:
        raise CommandError(vm.name, {"execute": cmd, "arguments": args}, reply, vm.argv)
    return reply["return"]


def _export(vm: Machine, node: str, export: str) -> None:
    if vm.has_command("block-export-add"):
        reply = vm.execute("block-export-add", {"type": "nbd", "id": export, "name": export,
                                                "node-name": node, "bitmaps": [VIEW_BITMAP]})
        if "error" not in reply or not vm.has_command("nbd-server-add"):
            if "error" in reply:
                _ok(vm, "block-export-add", type="nbd", id=export, name=export,
                    node_name=node, bitmaps=[VIEW_BITMAP])
            return
    _ok(vm, "nbd-server-add", device=node, name=export, bitmap=VIEW_BITMAP)


def _unexport(vm: Machine) -> None:
    if vm.has_command("block-export-del"):
        _ok(vm, "block-export-del", id=VIEW_EXPORT)
        # the export goes away asynchronously: its event says when (and must not be left
        # for a case waiting for its own export's event)
        vm.event_wait("BLOCK_EXPORT_DELETED", timeout=10.0,
                      match=lambda e: bool(e["data"].get("id") == VIEW_EXPORT))
    else:
        _ok(vm, "nbd-server-remove", name=VIEW_EXPORT)
