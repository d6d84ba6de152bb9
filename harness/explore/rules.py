"""The rules of the exploration: a Hypothesis ``RuleBasedStateMachine`` over live QEMU.

Each rule draws plain values (shrinking toward the first choice, zero, one byte), asks
the :class:`harness.explore.world.World` to act, and records the step; the invariant is
the oracle. A command QEMU refuses leaves the model unchanged, so a refusal is an
outcome, not a failure.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from harness import actions
from harness.errors import HarnessError, MachineError
from harness.explore.steps import Call, Expr, Stmt, source
from harness.explore.world import World, failing_steps
from harness.session import Environment

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
#: the guest's disk, where writes are issued (they land in the active layer)
DEVICE = actions.GUEST_DEVICE
#: more layers than this and a snapshot is not drawn (each costs a file and a node)
MAX_CHAIN = 3
#: more bitmaps than this on the disk and no add is drawn (each costs a check per step)
MAX_BITMAPS = 5


def region(size: int, from_end: bool, distance: int, length: int) -> tuple[int, int]:
    """``(offset, length)`` of a request ``distance`` bytes from the start (or the end) of a
    disk of ``size`` bytes, clipped into it. Drawn values shrink toward ``(False, 0, 1)``:
    the first byte; ``from_end`` with distance 0 is the very last byte(s) of the disk."""
    length = max(1, min(length, size))
    distance = max(0, min(distance, size - length))
    return (size - length - distance if from_end else distance), length


def resized(size: int, shrink: bool, eighths: int, sectors: int) -> int:
    """The new size of a disk of ``size`` bytes: ``eighths`` x 1/8 of it plus ``sectors``
    x 512 bytes smaller or larger (QEMU's qcow2 takes multiples of 512 only; a disk keeps
    at least one sector). Shrinks toward one sector more or less."""
    delta = (size * max(0, eighths) // 8) // SECTOR * SECTOR + max(1, sectors) * SECTOR
    return max(SECTOR, size - delta) if shrink else size + delta


#: what guest writes write (the bitmaps care where, not what)
PATTERN = Expr("0x5A", 0x5A)


sizes_in = st.sampled_from([1, SECTOR, 4 * KiB, 64 * KiB])
GRANULARITIES = [64 * KiB, SECTOR, 4 * KiB, MiB, 16 * MiB, 8 * KiB, 128 * KiB]
DISK_SIZES = [4 * MiB, 4 * MiB + SECTOR, 4 * MiB - SECTOR, 3 * MiB + 64 * KiB + 3 * SECTOR,
              MiB + SECTOR, 8 * MiB - 7 * SECTOR]


def scaled(units: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """A byte count as unit x n: shrinks toward 1 byte, reaches sectors and granules."""
    return st.builds(lambda u, n: u * n, sizes_in, units)


#: one guest request: (kind, from the end?, distance, length), as :func:`region` takes it
REQUEST = st.tuples(st.sampled_from(["write", "write -z", "discard"]), st.booleans(),
                    scaled(st.integers(0, 128)), scaled(st.integers(1, 32)))


@dataclass
class Context:
    """What the machine class reads: set by :func:`run` before Hypothesis starts it."""

    env: Environment
    scratch: Path
    keep_failed: bool = True
    examples: int = 0
    steps: int = 0
    longest: int = 0
    checks: int = 0  # bitmap checks the oracle made (live and on disk)
    started: float = field(default_factory=time.monotonic)
    last: World | None = None
    #: the failing example with the fewest steps seen (for a failure Hypothesis could not
    #: replay the same way: then its own shrunk example is not the one to print)
    smallest: World | None = None
    on_example: Callable[[Context], None] | None = None


CONTEXT: Context | None = None


class BitmapMachine(RuleBasedStateMachine):
    """The rules. Each draws plain values (shrinking toward the first choice, zero, one
    byte), asks :class:`World` to act, and records the step; the invariant is the oracle."""

    def __init__(self) -> None:
        super().__init__()
        ctx = CONTEXT
        assert ctx is not None, "run() sets the context before Hypothesis starts"
        self.ctx = ctx
        scratch = ctx.scratch / f"ex{ctx.examples:05d}"
        shutil.rmtree(scratch, ignore_errors=True)
        self.w = World(ctx.env, scratch)
        ctx.last = self.w
        self.failed = True

    # -- the start --------------------------------------------------------------------------

    @initialize(size=st.one_of(st.sampled_from(DISK_SIZES),
                               st.integers(2, 16 * 1024).map(lambda k: k * SECTOR)),
                cluster=st.sampled_from([64 * KiB, 4 * KiB, SECTOR]),
                bitmaps=st.lists(st.tuples(st.sampled_from(GRANULARITIES), st.booleans()),
                                 min_size=1, max_size=2),
                requests=st.lists(REQUEST, max_size=2))
    def start(self, size: int, cluster: int, bitmaps: list[tuple[int, bool]],
              requests: list[tuple[str, bool, int, int]]) -> None:
        """The disk, one or two bitmaps on it from the start (the subject of every
        example; the rules add, merge and remove more) and what the guest wrote first."""
        w = self.w
        w.chain = ["d0"]
        w.sizes["d0"] = size
        opts = [] if cluster == 64 * KiB else [f"cluster_size={cluster}"]
        w.do(Stmt(Call.of("qio.img.create", w.file("d0"), size, "qcow2", *opts)))
        w.launch()
        for granularity, persistent in bitmaps:
            more = {"persistent": True} if persistent else {}
            w.qmp("block-dirty-bitmap-add", node="d0", name=w.fresh("b"),
                  granularity=granularity, **more)
        for kind, from_end, distance, length in requests:
            self.request(kind, *region(size, from_end, distance, length))
        w.end_step(f"a disk of {size:#x} bytes, {cluster}-byte clusters")

    # -- data -------------------------------------------------------------------------------

    @precondition(lambda self: self.w.running)
    @rule(requests=st.lists(REQUEST, min_size=1, max_size=3))
    def write(self, requests: list[tuple[str, bool, int, int]]) -> None:
        """One to three guest requests: ``write``, ``write -z`` or ``discard``, each of any
        length at any distance from the start or the end of the disk."""
        w = self.w
        done = []
        for kind, from_end, distance, length in requests:
            off, n = region(w.size, from_end, distance, length)
            self.request(kind, off, n)
            done.append(f"{kind} {off:#x}+{n:#x}")
        w.end_step(f"{', '.join(done)} through the guest's disk (lands in {w.top})")

    def request(self, kind: str, off: int, n: int) -> None:
        w = self.w
        if kind == "write":
            c = Call.of("guest_writes", Expr("vm", w.vm), [(off, n)], PATTERN)
            checked = Call.of("vm.qemu_io", DEVICE, f"write -P 0x5a {off:#x} {n:#x}",
                              log=True, device=True, check=False)
        else:
            c = Call.of("vm.qemu_io", DEVICE, f"{kind} {off:#x} {n:#x}", log=True,
                        device=True)
            checked = c.with_kwargs(check=False)
        w._pending.append(Stmt(c))
        try:
            w.call(checked.without("check"))
        except MachineError as e:
            if type(e) is not MachineError:
                raise  # QEMU died or did not answer: a failure, not a refusal
            w._pending[-1] = Stmt(checked)  # refused (a read-only node): nothing modelled

    # -- bitmaps ----------------------------------------------------------------------------

    @precondition(lambda self: self.w.running and len(self.w.live_bitmaps()) < MAX_BITMAPS)
    @rule(pick=st.integers(0, 3), granularity=st.sampled_from(GRANULARITIES),
          persistent=st.booleans(), disabled=st.booleans(), in_transaction=st.booleans())
    def bitmap_add(self, pick: int, granularity: int, persistent: bool, disabled: bool,
                   in_transaction: bool) -> None:
        w = self.w
        node = w.chain[-1 - pick % len(w.chain)]
        name = w.fresh("b")
        more: dict[str, Any] = {}
        if persistent:
            more["persistent"] = True
        if disabled:
            more["disabled"] = True
        if in_transaction:
            w.qmp("transaction", actions=[Call.of("bitmap_add", node, name, granularity,
                                                  **more)])
        else:
            w.qmp("block-dirty-bitmap-add", node=node, name=name, granularity=granularity,
                  **more)
        w.end_step(f"add {name} on {node}")

    @precondition(lambda self: self.w.running and self.w.live_bitmaps())
    @rule(op=st.sampled_from(["disable", "enable", "clear", "remove"]), pick=st.integers(0, 9),
          in_transaction=st.booleans())
    def bitmap_op(self, op: str, pick: int, in_transaction: bool) -> None:
        w = self.w
        node, name, _ = w.live_bitmaps()[pick % len(w.live_bitmaps())]
        cmd = f"block-dirty-bitmap-{op}"
        if in_transaction:
            w.qmp("transaction", actions=[Call.of("action", cmd, node=node, name=name)])
        else:
            w.qmp(cmd, node=node, name=name)
        w.end_step(f"{op} {node}/{name}")

    @precondition(lambda self: self.w.running and self.w.live_bitmaps())
    @rule(into=st.integers(0, 9), sources=st.lists(st.integers(0, 9), min_size=1,
                                                     max_size=3),
          in_transaction=st.booleans())
    def merge(self, into: int, sources: list[int], in_transaction: bool) -> None:
        """Never an empty source list (the known SIGSEGV of cases/test_bitmap_qmp.py)."""
        w = self.w
        have = w.live_bitmaps()
        node, name, _ = have[into % len(have)]
        srcs: list[Any] = []
        for s in sources:
            snode, sname, _ = have[s % len(have)]
            srcs.append(sname if snode == node else {"node": snode, "name": sname})
        if in_transaction:
            w.qmp("transaction", actions=[Call.of("action", "block-dirty-bitmap-merge",
                                                  node=node, target=name, bitmaps=srcs)])
        else:
            w.qmp("block-dirty-bitmap-merge", node=node, target=name, bitmaps=srcs)
        w.end_step(f"merge into {node}/{name}")

    # -- the graph --------------------------------------------------------------------------

    @precondition(lambda self: self.w.running and len(self.w.chain) < MAX_CHAIN)
    @rule()
    def snapshot(self) -> None:
        w = self.w
        node = w.fresh("s")
        if w.qmp("blockdev-snapshot-sync", node_name=w.top, snapshot_file=Expr(
                f'str(qio.path("{w.file(node)}"))', str(w.case.path(w.file(node)))),
                snapshot_node_name=node, format="qcow2"):
            w.sizes[node] = w.size
            w.chain.append(node)
        w.end_step(f"external snapshot {node}")

    @precondition(lambda self: self.w.running and len(self.w.chain) >= 2)
    @rule(active=st.booleans(), pick=st.integers(0, 3))
    def commit(self, active: bool, pick: int) -> None:
        w = self.w
        job = w.fresh("job")
        n = len(w.chain)
        if active or n < 3:
            base = pick % (n - 1)
            top = n - 1
            ok = w.qmp("block-commit", job_id=job, device=w.top, base_node=w.chain[base])
        else:
            top = 1 + pick % (n - 2)
            base = top - 1
            ok = w.qmp("block-commit", job_id=job, device=w.top, top_node=w.chain[top],
                       base_node=w.chain[base])
        if ok and w.job(job, complete=top == n - 1) is None:
            # QEMU grows a base smaller than the top it commits (never shrinks it)
            base_node = w.chain[base]
            w.sizes[base_node] = max(w.sizes[base_node], w.sizes[w.chain[top]])
            w.chain = w.chain[:base + 1] + w.chain[top + 1:]
        w.end_step(f"{'active' if top == n - 1 else 'intermediate'} commit")

    @precondition(lambda self: self.w.running and self.w.has("blockdev-reopen")
                  and len(self.w.chain) >= 2)
    @rule(pick=st.integers(0, 3))
    def reopen(self, pick: int) -> None:
        """A backing layer read-only <-> read-write. Not the active layer: the guest's
        disk holds write permission on it, so QEMU refuses a read-only reopen (right, but
        that refusal leaves persistent bitmaps read-only: the known QEMU bug of
        cases/test_reopen_refused.py)."""
        w = self.w
        i = len(w.chain) - 2 - pick % (len(w.chain) - 1)
        node = w.chain[i]
        ro = not w.read_only(node)
        kw: dict[str, Any] = {"discard": "unmap", "read_only": ro}
        if i > 0:
            kw["backing"] = w.chain[i - 1]
        if node in w.file_nodes:
            kw["file_node"] = w.file_nodes[node]
        w.qmp("blockdev-reopen", options=[Call.of("qcow2_node", w.path(node), node, **kw)])
        w.end_step(f"reopen {node} read-{'only' if ro else 'write'}")

    @precondition(lambda self: self.w.running)
    @rule(eighths=st.integers(0, 7), sectors=st.integers(1, 16), through_dirty=st.booleans())
    def shrink(self, eighths: int, sectors: int, through_dirty: bool) -> None:
        """``block_resize`` of the active layer to a smaller size (bits past the new end
        must go, but for the granule that holds it). With ``through_dirty`` the cut goes
        through what a bitmap tracks: to the start of the granule that holds the last
        byte the model says is dirty (``sectors`` - 1 sectors before it), the one shrink
        that makes QEMU drop dirty bits."""
        w = self.w
        cut = w.last_dirty_granule(w.top) if through_dirty else None
        if cut is None:
            self.resize(True, eighths, sectors)
            return
        new = max(SECTOR, cut - (sectors - 1) * SECTOR)
        if w.qmp("block_resize", node_name=w.top, size=new):
            w.sizes[w.top] = new
        w.end_step(f"shrink {w.top} to {new:#x}, through its dirty part")

    @precondition(lambda self: self.w.running)
    @rule(eighths=st.integers(0, 7), sectors=st.integers(1, 16))
    def grow(self, eighths: int, sectors: int) -> None:
        """``block_resize`` of the active layer to a larger size (the new part clean)."""
        self.resize(False, eighths, sectors)

    def resize(self, shrink: bool, eighths: int, sectors: int) -> None:
        w = self.w
        new = resized(w.size, shrink, eighths, sectors)
        if w.qmp("block_resize", node_name=w.top, size=new):
            w.sizes[w.top] = new
        w.end_step(f"{'shrink' if shrink else 'grow'} {w.top} to {new:#x}")

    # -- jobs -------------------------------------------------------------------------------

    @precondition(lambda self: self.w.running)
    @rule(sync=st.sampled_from(["incremental", "bitmap", "full", "top"]),
          mode=st.sampled_from(["on-success", "always", "never"]), pick=st.integers(0, 9))
    def backup(self, sync: str, mode: str, pick: int) -> None:
        w = self.w
        mine = [b for n, b, _ in w.live_bitmaps() if n == w.top]
        if sync in ("incremental", "bitmap") and not mine:
            sync = "full"
        target = w.fresh("t")
        job = w.fresh("job")
        kw: dict[str, Any] = {"sync": sync}
        if sync in ("incremental", "bitmap"):
            kw["bitmap"] = mine[pick % len(mine)]
            if sync == "bitmap":
                kw["bitmap_mode"] = mode
        w.do(Stmt(Call.of("add_target", Expr("qio", w.case), Expr("vm", w.vm),
                          w.file(target), w.size)))
        w.started(Stmt(Call.of("del_target", Expr("vm", w.vm), w.file(target))))
        if w.qmp("blockdev-backup", Call.of("backup_job", job, w.top, target, **kw)):
            w.job(job)
        w.finished()
        w.do(Stmt(Call.of("del_target", Expr("vm", w.vm), w.file(target))))
        w.end_step(f"backup sync={sync}")

    @precondition(lambda self: self.w.running and len(self.w.chain) == 1
                  and self.w.top in self.w.explicit)
    @rule(mode=st.sampled_from(["background", "write-blocking"]), during=st.booleans(),
          from_end=st.booleans(), distance=scaled(st.integers(0, 128)),
          length=scaled(st.integers(1, 32)))
    def mirror(self, mode: str, during: bool, from_end: bool, distance: int,
               length: int) -> None:
        """``blockdev-mirror`` of the disk to a new image, with guest writes while the
        job mirrors (``copy-mode`` decides how they reach the target); completed, the
        guest's disk is on the copy and the source stays a node of its own (with its
        bitmaps: they do not move)."""
        w = self.w
        target, job = w.fresh("m"), w.fresh("job")
        w.do(Stmt(Call.of("add_target", Expr("qio", w.case), Expr("vm", w.vm),
                          w.file(target), w.size)))
        w.explicit.add(target)
        if not w.qmp("blockdev-mirror", job_id=job, device=w.top, target=target, sync="full",
                     copy_mode=mode):
            w.do(Stmt(Call.of("del_target", Expr("vm", w.vm), w.file(target))))
        else:
            kw: dict[str, Any] = {"complete": True}
            if during:
                off, n = region(w.size, from_end, distance, length)
                write = Call.of("guest_writes", Expr("vm", w.vm), [(off, n)], PATTERN)
                kw["on_ready"] = Expr(f"lambda: {source(write)}", lambda: w.call(write))
            if w.job(job, **kw) is None:
                w.sizes[target] = w.size
                w.chain = [target]
        w.end_step(f"mirror ({mode}) to {target}")

    @precondition(lambda self: self.w.running and self.w.has("block-export-add")
                  and any(n == self.w.top for n, _, _ in self.w.live_bitmaps()))
    @rule(pick=st.integers(0, 9), during=st.booleans(), window=st.booleans(),
          from_end=st.booleans(), distance=scaled(st.integers(0, 128)),
          length=scaled(st.integers(1, 64)))
    def pull(self, pick: int, during: bool, window: bool, from_end: bool, distance: int,
             length: int) -> None:
        """A pull backup: in one transaction a disabled copy of a bitmap of the disk and
        a fleecing overlay (``sync=none``), both exported over NBD; the guest may write
        meanwhile; the client reads the copy's dirty extents (the whole disk, or any
        offset and length), which must hold every range the model requires (not exactly:
        after a commit the model does not know every bit, as in a live check)."""
        w = self.w
        mine = [(b, g) for n, b, g in w.live_bitmaps() if n == w.top]
        src, gran = mine[pick % len(mine)]
        fleece, copy, job = w.fresh("f"), w.fresh("x"), w.fresh("job")
        vm = Expr("vm", w.vm)
        w.do(Stmt(Call.of("qio.img.create", w.file(fleece), w.size, "qcow2")))
        w.do(Stmt(Call.of("vm.qmp_log", "blockdev-add", Call.of(
            "qcow2_node", w.path(fleece), fleece, backing=w.top))))
        w.started(Stmt(Call.of("vm.qmp_log", "blockdev-del", node_name=fleece)))
        if w.qmp("transaction", actions=[
                Call.of("bitmap_add", w.top, copy, gran, disabled=True),
                Call.of("action", "block-dirty-bitmap-merge", node=w.top, target=copy,
                        bitmaps=[src]),
                Call.of("action", "blockdev-backup", job_id=job, device=w.top, target=fleece,
                        sync="none")]):
            w.started(Stmt(Call.of("vm.qmp_log", "job-cancel", id=job)),
                      Stmt(Call.of("vm.run_job", job)),
                      Stmt(Call.of("vm.qmp_log", "block-dirty-bitmap-remove", node=w.top,
                                   name=copy)))
            assert w.vm is not None
            sock = Expr('vm.socket_path.parent / "pull.nbd"',
                        w.vm.socket_path.parent / "pull.nbd")
            w.do(Stmt(Call.of("nbd_server_start", vm, sock)))
            w.started(Stmt(Call.of("vm.qmp_log", "nbd-server-stop")))
            w.do(Stmt(Call.of("nbd_export_add", vm, fleece, "pull", sock, copy), "export = {}"))
            export = Expr("export", w.ns["export"])
            w.started(Stmt(Call.of("nbd_export_del", vm, export)))
            off, n = region(w.size, from_end, distance, length)
            if during:
                w.do(Stmt(Call.of("guest_writes", vm, [(off, n)], PATTERN)))
            where = {"window": (off, n)} if window else {}
            w.do(Stmt(Call.of("qio.oracle.check_ranges", vm, w.top, copy, Call.of(
                "dirty_extents", Expr("qio.img", w.case.img), export, copy, **where),
                f"pulled {copy}", exact=False, **where)))
            w.finished()
            w.do(Stmt(Call.of("nbd_export_del", vm, export)))
            w.finished()
            w.qmp("nbd-server-stop")
            w.finished()
            w.qmp("job-cancel", id=job)
            w.job(job)
            w.qmp("block-dirty-bitmap-remove", node=w.top, name=copy)
        w.finished()
        w.qmp("blockdev-del", node_name=fleece)
        w.end_step(f"pull backup of {w.top}/{src}")

    # -- I/O errors ---------------------------------------------------------------------------

    @precondition(lambda self: self.w.running and self.w.top in self.w.file_nodes
                  and self.w.has("blockdev-reopen"))
    @rule(event=st.sampled_from(["write_aio", "l2_update", "refblock_update", "pwritev"]),
          errno=st.sampled_from([5, 28]), requests=st.lists(REQUEST, min_size=1, max_size=2))
    def ioerror(self, event: str, errno: int, requests: list[tuple[str, bool, int, int]]) -> None:
        """Guest requests while the active layer's file fails one write with ``errno``
        (EIO, ENOSPC): a ``blkdebug`` filter put between the qcow2 node and its file, its
        rule armed by ``event`` (``write_aio``: a data write; ``l2_update``,
        ``refblock_update``: metadata of a cluster being allocated; ``pwritev``: the next
        write of any kind), taken out again at the end of the step. A failed request's
        range is not required in the bitmaps (harness/oracle.py says why); everything
        else must stay right, live, on disk and after a restart."""
        w = self.w
        top, dbg = w.top, w.fresh("dbg")
        kw: dict[str, Any] = {"discard": "unmap"}
        if len(w.chain) > 1:
            kw["backing"] = w.chain[-2]
        if w.qmp("blockdev-add", driver="blkdebug", node_name=dbg, image=w.file_nodes[top],
                 inject_error=[{"event": event, "iotype": "write", "errno": errno,
                                "once": True}]):
            w.started(Stmt(Call.of("vm.qmp_log", "blockdev-del", node_name=dbg)))
            if w.qmp("blockdev-reopen", options=[Call.of(
                    "qcow2_node", w.path(top), top, file=dbg, **kw)]):
                w.started(Stmt(Call.of("vm.qmp_log", "blockdev-reopen", options=[Call.of(
                    "qcow2_node", w.path(top), top, file=w.file_nodes[top], **kw)])))
                done = []
                for kind, from_end, distance, length in requests:
                    off, n = region(w.size, from_end, distance, length)
                    self.request(kind, off, n)
                    done.append(f"{kind} {off:#x}+{n:#x}")
                w.finished()
                w.qmp("blockdev-reopen", options=[Call.of(
                    "qcow2_node", w.path(top), top, file=w.file_nodes[top], **kw)])
            w.finished()
            w.qmp("blockdev-del", node_name=dbg)
        w.end_step(f"{event} fails once with errno {errno} under {top}")

    # -- life and death ---------------------------------------------------------------------

    @precondition(lambda self: self.w.running)
    @rule(kill=st.booleans())
    def stop(self, kill: bool) -> None:
        w = self.w
        w.do(Stmt(Call.of("vm.kill" if kill else "vm.shutdown")))
        w.running = False
        w.end_step("SIGKILL" if kill else "clean shutdown")

    @precondition(lambda self: not self.w.running)
    @rule()
    def restart(self) -> None:
        self.w.launch()
        self.w.end_step("start again")

    # -- offline ----------------------------------------------------------------------------

    @precondition(lambda self: not self.w.running)
    @rule(op=st.sampled_from(["--add", "--clear", "--disable", "--enable", "--remove",
                              "--merge"]),
          pick=st.integers(0, 9), other=st.integers(0, 9), granularity=st.sampled_from(
              GRANULARITIES), disabled=st.booleans())
    def offline_bitmap(self, op: str, pick: int, other: int, granularity: int,
                       disabled: bool) -> None:
        w = self.w
        node = w.top
        have = w.stored_bitmaps(node)
        if op != "--add" and not have:
            op = "--add"
        if op == "--add":
            name = w.fresh("b")
            args = ["bitmap", "--add", "-g", str(granularity)]
            if disabled:
                args.append("--disable")
            w.tool(*args, w.file(node), name)
        elif op == "--merge":
            owners = [n for n in w.chain if w.stored_bitmaps(n)]
            src_node = owners[other % len(owners)]
            srcs = w.stored_bitmaps(src_node)
            src = srcs[other % len(srcs)]
            extra = [] if src_node == node else ["-b", w.file(src_node), "-F", "qcow2"]
            w.tool("bitmap", "--merge", src, *extra, w.file(node), have[pick % len(have)])
        else:
            w.tool("bitmap", op, w.file(node), have[pick % len(have)])
        w.end_step(f"qemu-img bitmap {op}")

    @precondition(lambda self: not self.w.running)
    @rule(skip_broken=st.booleans())
    def convert(self, skip_broken: bool) -> None:
        w = self.w
        node = w.fresh("c")
        extra = ["--skip-broken-bitmaps"] if skip_broken else []
        if w.tool("convert", "-O", "qcow2", "--bitmaps", *extra, w.file(w.top), w.file(node)):
            w.sizes[node] = w.size
            w.chain = [node]
        w.end_step(f"qemu-img convert --bitmaps to {w.file(node)}")

    # -- the invariant ----------------------------------------------------------------------

    @invariant()
    def oracle_agrees(self) -> None:
        if self.w.chain:
            self.w.check()

    def teardown(self) -> None:
        """The end of an example: a clean shutdown (a step like any other, so the oracle
        checks every bitmap live before it and on disk after it), then the scratch dir
        is removed unless the example failed."""
        w, ctx = self.w, self.ctx
        try:
            if w.running and not w.failed:
                w.do(Stmt(Call.of("vm.shutdown")))
                w.running = False
                w.end_step("clean shutdown at the end")
                w.check()
        finally:
            if w.failed and w.error is not None and (
                    ctx.smallest is None or len(failing_steps(w)) < len(failing_steps(
                        ctx.smallest))):
                ctx.smallest = w
            ctx.examples += 1
            ctx.steps += len(w.steps)
            ctx.longest = max(ctx.longest, len(w.steps))
            ctx.checks += w.case.oracle.checks
            problems = w.close(failed=w.failed)
            if ctx.on_example is not None:
                ctx.on_example(ctx)
        if problems:
            raise HarnessError("\n".join(problems))
        shutil.rmtree(w.case.scratch, ignore_errors=True)
