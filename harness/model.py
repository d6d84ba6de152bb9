"""The model: what each dirty bitmap must contain, computed from the writes a case issued.

Golden files catch only what their author foresaw. The model catches "bitmap valid but
incomplete" in any scenario: every write a case issues is recorded with the node it went
to; every bitmap operation (add, disable, enable, clear, merge, remove) and every graph
change that moves data into a node (commit) is mirrored here, by the oracle that follows
the case's commands (harness/oracle.py). For each bitmap the model
knows the byte ranges that *must* be dirty, rounded out to the bitmap's granularity.

The check rule (``verdict``):
  * a bitmap that QEMU flags inconsistent is unusable and says so: nothing more to check;
  * otherwise it must cover every range the model requires: a missing range is the
    reference bug (an incremental backup built from that bitmap would silently miss data);
  * dirty ranges the model did not require are reported separately as *extra*. They cost
    backup size, not correctness, and QEMU documents some (a commit copies whole clusters of
    the top image, so the base's bitmaps may gain a cluster's worth around each write).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from harness.errors import ModelError

Range = tuple[int, int]  # (offset, length) in guest bytes


class Extents:
    """A set of byte ranges kept as sorted, merged, half-open ``[start, end)`` pairs."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._spans: list[tuple[int, int]] = []
        for off, length in ranges:
            self.add(off, length)

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        start, end = offset, offset + length
        out: list[tuple[int, int]] = []
        placed = False
        for s, e in self._spans:
            if e < start:
                out.append((s, e))
            elif end < s:
                if not placed:
                    out.append((start, end))
                    placed = True
                out.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            out.append((start, end))
        self._spans = sorted(out)

    def update(self, other: Extents) -> None:
        for off, length in other:
            self.add(off, length)

    def copy(self) -> Extents:
        return Extents(iter(self))

    def rounded(self, granularity: int, limit: int) -> Extents:
        """Every granule touched by a range, clipped at ``limit`` (the disk size)."""
        out = Extents()
        for s, e in self._spans:
            start = s - s % granularity
            end = min(-(-e // granularity) * granularity, limit)
            out.add(start, end - start)
        return out

    def minus(self, other: Extents) -> Extents:
        """The ranges of self not covered by ``other``."""
        out = Extents()
        cut = other._spans
        for s, e in self._spans:
            pos = s
            for cs, ce in cut:
                if ce <= pos or cs >= e:
                    continue
                if cs > pos:
                    out.add(pos, cs - pos)
                pos = max(pos, ce)
                if pos >= e:
                    break
            if pos < e:
                out.add(pos, e - pos)
        return out

    def window(self, start: int, end: int) -> Extents:
        """The part of these ranges inside ``[start, end)``."""
        return Extents((max(s, start), min(e, end) - max(s, start))
                       for s, e in self._spans if s < end and e > start)

    def truncate(self, end: int) -> None:
        """Drop everything at or past ``end``, in place (the object may be shared)."""
        self._spans = [(s, min(e, end)) for s, e in self._spans if s < end]

    def total(self) -> int:
        return sum(e - s for s, e in self._spans)

    def __iter__(self) -> Iterator[Range]:
        return iter([(s, e - s) for s, e in self._spans])

    def __len__(self) -> int:
        return len(self._spans)

    def __bool__(self) -> bool:
        return bool(self._spans)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Extents) and self._spans == other._spans

    def __repr__(self) -> str:
        return f"Extents({format_ranges(self)})"


def format_ranges(ranges: Iterable[Range], limit: int = 12) -> str:
    """``[0x10000+0x20000, 0x1000000+0x10000]``: hex offsets, as qemu-io takes them."""
    items = [f"{o:#x}+{n:#x}" for o, n in ranges]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + more + "]"


@dataclass
class ModelBitmap:
    """What one bitmap must contain: the raw write ranges it saw, and its state."""

    name: str
    granularity: int
    recording: bool = True
    persistent: bool = False
    seen: Extents = field(default_factory=Extents)
    #: why this bitmap's exact ranges differ from run to run (shown instead of them)
    varies: str | None = None

    def required(self, size: int) -> Extents:
        return self.seen.rounded(self.granularity, size)

    def copy(self) -> ModelBitmap:
        return replace(self, seen=self.seen.copy())

    def verdict(self, node: str, size: int, actual: Iterable[Range],
                inconsistent: bool = False) -> Verdict:
        """This bitmap (on ``node`` of ``size`` bytes) against what QEMU shows."""
        required = self.required(size)
        got = Extents(actual)
        return Verdict(node, self.name, inconsistent, required.minus(got), got.minus(required),
                       required, got, size, self.varies)


@dataclass
class ModelNode:
    """A node in the model's graph: its size, the bytes written into it, its bitmaps."""

    name: str
    size: int
    data: Extents = field(default_factory=Extents)
    bitmaps: dict[str, ModelBitmap] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The comparison of one bitmap with the model; ``ok`` is the rule that must hold.

    ``size`` is the node's size in bytes (0: unknown), the scale a drawing of it needs.
    """

    node: str
    bitmap: str
    inconsistent: bool
    missing: Extents
    extra: Extents
    required: Extents
    actual: Extents
    size: int = 0
    varies: str | None = None

    @property
    def ok(self) -> bool:
        return self.inconsistent or not self.missing

    def describe(self) -> str:
        """One line for the transcript: stable, no QEMU-internal numbers beyond ranges."""
        if self.inconsistent:
            return f"{self.node}/{self.bitmap}: inconsistent (flagged by QEMU, must not be used)"
        state = "complete" if not self.missing else "INCOMPLETE"
        if self.varies is not None:
            return f"{self.node}/{self.bitmap}: {state} ({self.varies})"
        line = f"{self.node}/{self.bitmap}: {state}, dirty {format_ranges(self.actual)}"
        if self.missing:
            line += f", missing {format_ranges(self.missing)}"
        if self.extra:
            line += f", extra {format_ranges(self.extra)}"
        return line

    def failure(self, where: str) -> str:
        return (f"bitmap {self.bitmap!r} on {self.node!r} ({where}) is not flagged "
                f"inconsistent but misses writes the model says it saw: missing "
                f"{format_ranges(self.missing)} ({self.missing.total()} bytes); "
                f"model requires {format_ranges(self.required)}, QEMU has "
                f"{format_ranges(self.actual)}")



@dataclass(frozen=True)
class SyncBitmapJob:
    """A backup job's hold on its sync bitmap, from ``Model.backup_begin`` to ``backup_end``.

    ``at_start`` is what the bitmap had to contain when the job took it (rounded to its
    granularity): the clusters the job is asked to copy. ``successor`` names the model's
    stand-in for QEMU's successor bitmap, which records the writes made during the job.
    """

    node: str
    bitmap: str
    at_start: Extents
    successor: str


#: ``bitmap-mode`` values (QAPI BitmapSyncMode); ``sync=incremental`` means ``on-success``.
BITMAP_SYNC_MODES = ("on-success", "always", "never")


class Model:
    """Nodes, their bitmaps, and every write: one VM's graph as the oracle keeps it in
    step with QEMU (harness/oracle.py); pure, so it can be tested without QEMU."""

    def __init__(self) -> None:
        self.nodes: dict[str, ModelNode] = {}

    def node(self, name: str, size: int) -> ModelNode:
        """Declare a node (an image, an overlay); idempotent for the same size."""
        if name in self.nodes:
            return self.nodes[name]
        self.nodes[name] = ModelNode(name, size)
        return self.nodes[name]

    def _node(self, name: str) -> ModelNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise ModelError(f"the model has no node {name!r} (declare it with node())") from None

    def bitmap(self, node: str, name: str) -> ModelBitmap:
        n = self._node(node)
        try:
            return n.bitmaps[name]
        except KeyError:
            raise ModelError(f"the model has no bitmap {name!r} on node {node!r}") from None

    # -- bitmap operations, mirroring QMP / qemu-img --------------------------------------

    def add_bitmap(self, node: str, name: str, granularity: int = 65536,
                   recording: bool = True, persistent: bool = False) -> None:
        n = self._node(node)
        if name in n.bitmaps:
            raise ModelError(f"bitmap {name!r} already exists on {node!r}")
        n.bitmaps[name] = ModelBitmap(name, granularity, recording, persistent)

    def remove_bitmap(self, node: str, name: str) -> None:
        self.bitmap(node, name)
        del self.nodes[node].bitmaps[name]

    def disable(self, node: str, name: str) -> None:
        self.bitmap(node, name).recording = False

    def enable(self, node: str, name: str) -> None:
        self.bitmap(node, name).recording = True

    def clear(self, node: str, name: str) -> None:
        b = self.bitmap(node, name)
        b.seen = Extents()
        b.varies = None

    def merge(self, node: str, target: str, sources: Iterable[tuple[str, str]]) -> None:
        """OR each (node, bitmap) source into ``target``."""
        dst = self.bitmap(node, target)
        for src_node, src in sources:
            dst.seen.update(self.bitmap(src_node, src).required(self._node(src_node).size))

    def resize(self, node: str, size: int) -> None:
        """The node is resized (``block_resize``, grow or shrink).

        Data past the new end is gone. A bitmap keeps the granule that holds the new end
        whole (QEMU clears only whole granules past it) and drops everything after; a
        grown disk's new part is clean, and a partial last granule that was dirty covers
        the whole granule once the disk grows past it.
        """
        n = self._node(node)
        n.size = size
        n.data.truncate(size)
        for b in n.bitmaps.values():
            b.seen.truncate(-(-size // b.granularity) * b.granularity)

    # -- data ---------------------------------------------------------------------------

    def write(self, node: str, offset: int, length: int) -> None:
        """A write that lands in ``node`` (the active layer it was issued to)."""
        n = self._node(node)
        if offset < 0 or offset + length > n.size:
            raise ModelError(f"write {offset:#x}+{length:#x} is outside node {node!r} "
                             f"({n.size:#x} bytes)")
        n.data.add(offset, length)
        for b in n.bitmaps.values():
            if b.recording:
                b.seen.add(offset, length)

    def commit(self, top: str, base: str, through: Iterable[str] = ()) -> None:
        """``block-commit`` of ``top`` (and the ``through`` layers between) into ``base``.

        The data of every committed layer is written into ``base``, so the base's recording
        bitmaps must cover it. Layers are applied bottom-up, as the result is the same.
        What lies past the base's end is not (QEMU copies the top's length, and grows a
        smaller base to it first: the oracle resizes the base before this).
        """
        size = self._node(base).size
        for layer in [*through, top]:
            for off, length in self._node(layer).data.window(0, size):
                self.write(base, off, length)

    # -- backup jobs (blockdev-backup with a sync bitmap) -------------------------------

    def backup_begin(self, node: str, name: str) -> SyncBitmapJob:
        """A backup job started with bitmap ``name`` (sync=bitmap or incremental).

        QEMU freezes the bitmap and records writes made during the job in a successor
        (an anonymous bitmap that later replaces it or is merged back). The model adds a
        successor too, recording like the bitmap; the bitmap itself keeps requiring its
        bits (and the new writes) until ``backup_end`` applies the mode. So a case that
        forgets ``backup_end`` gets a stricter oracle, never a weaker one, and a check of
        every bitmap of the node trips over the leftover successor. Do not check the
        bitmap while the job runs (QEMU reports it busy, and its successor separately).
        """
        b = self.bitmap(node, name)
        successor = f"{name} (successor during a backup job)"
        self.add_bitmap(node, successor, b.granularity, recording=b.recording)
        return SyncBitmapJob(node, name, b.required(self._node(node).size), successor)

    def backup_end(self, job: SyncBitmapJob, mode: str, succeeded: bool,
                   received: Extents | None = None) -> None:
        """The job ended; apply QAPI ``BitmapSyncMode`` to the sync bitmap.

        * ``on-success`` (also what ``sync=incremental`` does): on success the bits the job
          started with are cleared (only the writes made during the job stay); on failure
          or cancel the bitmap is unchanged (its bits plus the job-time writes).
        * ``never``: unchanged, whatever the outcome (a differential manifest).
        * ``always``: the bits that were copied are cleared even when the job failed or
          was cancelled. What was copied is what the target actually received: pass
          ``received`` (the target's own allocated extents, from ``qemu-img map``); every
          granule not entirely received stays dirty. QEMU merges the block-copy bitmap
          (clusters not copied) into the successor, which is exactly this.

        A failed or cancelled job is the same thing here: QEMU ends both with an error
        status and applies the same rule.
        """
        if mode == "incremental":
            mode = "on-success"
        if mode not in BITMAP_SYNC_MODES:
            raise ModelError(f"unknown bitmap-mode {mode!r} (one of {BITMAP_SYNC_MODES})")
        synced = mode != "never" and (succeeded or mode == "always")
        if synced and not succeeded and received is None:
            raise ModelError("bitmap-mode 'always' after a failed or cancelled job needs "
                             "the extents the target received")
        b = self.bitmap(job.node, job.bitmap)
        during = self.bitmap(job.node, job.successor).seen
        self.remove_bitmap(job.node, job.successor)
        if not synced:
            return  # the bitmap recorded the job-time writes itself
        b.seen = during.copy()
        b.varies = None
        if not succeeded:
            size = self._node(job.node).size
            # a granule is clean only if all of it reached the target
            b.seen.update(job.at_start.minus(Extents(received or ())).rounded(
                b.granularity, size))

    # -- checking -----------------------------------------------------------------------

    def verdict(self, node: str, name: str, actual: Iterable[Range],
                inconsistent: bool = False) -> Verdict:
        return self.bitmap(node, name).verdict(node, self._node(node).size, actual,
                                               inconsistent)
