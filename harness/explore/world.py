"""One example's world: the case context the rules act on, and the oracle's check.

A :class:`World` holds a :class:`harness.session.Case` with one VM and what the rules need
to know of it (the chain of images, their sizes); every action goes through it and is
recorded as a :class:`harness.explore.steps.Step`. The invariant is the oracle's
(``harness/oracle.py``): every bitmap checked live while QEMU runs, every stored bitmap
checked in the image file while it does not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness import actions, backup, block
from harness.explore.steps import Call, Expr, Spread, Step, Stmt
from harness.session import Case, Environment
from harness.vm import VM


class World:
    """One example's case context (a :class:`Case` with one VM) and what the rules need
    to know of it: the chain of images (bottom first), its size, the bitmap names used.
    Every action goes through :meth:`do`, which records it as a :class:`Step`."""

    def __init__(self, env: Environment, scratch: Path) -> None:
        self.case = Case(env, scratch)
        self.vm: VM | None = None
        self.steps: list[Step] = []
        self.chain: list[str] = []  # node names, bottom first; file = NAME.qcow2
        #: nodes the monitor owns (``-blockdev``, ``blockdev-add``): they outlive their users
        self.explicit: set[str] = set()
        #: nodes whose file node has a name of ours (the active layer at launch)
        self.file_nodes: dict[str, str] = {}
        self.sizes: dict[str, int] = {}  # each node's virtual size
        self.counter = 0
        self.running = False
        self.ns: dict[str, Any] = {"qio": self.case, **{n: getattr(actions, n) for n in (
            "guest_writes", "action", "bitmap_add", "add_target", "del_target", "backup_job")},
            "blockdev": block.blockdev, "qcow2_node": block.qcow2_node,
            **{n: getattr(backup, n) for n in (
                "nbd_server_start", "nbd_export_add", "nbd_export_del", "dirty_extents")}}
        self._pending: list[Stmt] = []
        #: what the step in progress started and must undo (innermost last), each as the
        #: statements a case undoes it with: printed after a step that failed half-way,
        #: so that the case ends cleanly once QEMU passes the line that failed
        self.undo: list[tuple[Stmt, ...]] = []
        self.last_check: Stmt | None = None
        self.error: BaseException | None = None  # what failed this example

    # -- running calls ----------------------------------------------------------------------

    def _value(self, v: Any) -> Any:
        if isinstance(v, Call):
            return self.call(v)
        if isinstance(v, Expr):
            return v.value
        if isinstance(v, Spread):
            out: list[Any] = []
            for x in v.items:
                if isinstance(x, Call):
                    out += self._value(x)
                else:
                    out.append(self._value(x))
            return out
        if isinstance(v, list):
            return [self._value(x) for x in v]
        if isinstance(v, tuple):
            return tuple(self._value(x) for x in v)
        if isinstance(v, dict):
            return {k: self._value(x) for k, x in v.items()}
        return v

    def call(self, c: Call) -> Any:
        head, *rest = c.func.split(".")
        fn: Any = self.ns[head]
        for attr in rest:
            fn = getattr(fn, attr)
        try:
            return fn(*[self._value(a) for a in c.args],
                      **{k: self._value(v) for k, v in c.kwargs})
        except Exception as e:
            self.error = e
            raise

    def do(self, stmt: Stmt) -> Any:
        """Run a statement and keep it for the step being recorded."""
        self._pending.append(stmt)
        if stmt.form.startswith("vm.args = "):
            assert self.vm is not None
            self.vm.args = self._value(stmt.call)
            return None
        result = self.call(stmt.call)
        assigned = re.fullmatch(r"(\w+) = \{\}", stmt.form)
        if assigned:
            self.ns[assigned.group(1)] = result
            if assigned.group(1) == "vm":
                self.vm = result
        return result

    def qmp(self, cmd: str, *args: Any, **kw: Any) -> bool:
        """A QMP command whose answer is open: sent with ``check=False``, kept as the case
        would state QEMU's answer (accepted: plain; refused: ``expect_error=True``)."""
        c = Call.of("vm.qmp_log", cmd, *args, **kw)
        self._pending.append(Stmt(c))
        reply = self.call(c.with_kwargs(check=False))
        ok = "error" not in reply
        if not ok:
            self._pending[-1] = Stmt(c.with_kwargs(expect_error=True))
        return ok

    def tool(self, *args: Any) -> bool:
        """A qemu-img run whose outcome is open (refusals are QEMU's answer)."""
        c = Call.of("qio.img.run", *args)
        self._pending.append(Stmt(c))
        res = self.call(c.with_kwargs(check=False))
        if res.status != 0:
            self._pending[-1] = Stmt(c.with_kwargs(check=False))
        return bool(res.status == 0)

    def job(self, job_id: str, **kw: Any) -> str | None:
        c = Call.of("vm.run_job", job_id, **kw)
        self._pending.append(Stmt(c, "assert {} is None"))
        err = self.call(c)
        if err is not None:
            self._pending[-1] = Stmt(c)
        return err  # type: ignore[no-any-return]

    @property
    def failed(self) -> bool:
        """A step or a check did not finish: the example is failing."""
        return bool(self._pending) or self.last_check is not None

    def started(self, *undo: Stmt) -> None:
        """The step started something (an export, a job, a node) that ``undo`` ends."""
        self.undo.append(undo)

    def finished(self) -> None:
        """The step is about to undo the last thing it started (it runs that itself)."""
        self.undo.pop()

    def end_step(self, rule: str) -> None:
        if self._pending:
            self.steps.append(Step(rule, tuple(self._pending)))
        self._pending = []
        self.undo = []

    # -- the disk ---------------------------------------------------------------------------

    def file(self, node: str) -> str:
        return f"{node}.qcow2"

    def path(self, node: str) -> Expr:
        return Expr(f'qio.path("{self.file(node)}")', self.case.path(self.file(node)))

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def blockdevs(self) -> list[Any]:
        """``-blockdev`` options for the chain: backing layers read-only, as a snapshot
        leaves them; discards reach the driver (``discard=unmap``)."""
        out: list[Any] = []
        for i, node in enumerate(self.chain):
            kw: dict[str, Any] = {"discard": "unmap"}
            if i < len(self.chain) - 1:
                kw["read_only"] = True
            if i > 0:
                kw["backing"] = self.chain[i - 1]
            if i == len(self.chain) - 1:
                kw["file_node"] = f"{node}-file"  # named: I/O errors go between the two
            out.append(Call.of("blockdev", Call.of("qcow2_node", self.path(node), node, **kw)))
        return out

    def vm_args(self) -> Spread:
        """The chain's ``-blockdev`` options and the guest's disk on the active layer (a
        parent for the chain: without one an external snapshot's overlay would have no
        user and QEMU would drop it at once)."""
        parts = self.blockdevs()
        return Spread((*parts, "-device", f"virtio-blk-pci,drive={self.top},id=disk0"))

    def launch(self) -> None:
        if self.vm is None:
            self.do(Stmt(Call.of("qio.vm", args=self.vm_args()), "vm = {}"))
        else:
            self.do(Stmt(self.vm_args(), "vm.args = {}"))
        self.do(Stmt(Call.of("vm.launch")))
        self.running = True
        self.explicit = set(self.chain)
        self.file_nodes = {self.top: f"{self.top}-file"}

    def has(self, command: str) -> bool:
        return self.case.probe.has_command(command)

    @property
    def top(self) -> str:
        return self.chain[-1]

    @property
    def size(self) -> int:
        """The guest's disk size: its active layer's."""
        return self.sizes[self.top]

    # -- what the oracle knows (read only) --------------------------------------------------

    def live_bitmaps(self) -> list[tuple[str, str, int]]:
        """(node, bitmap, granularity) of every bitmap the model has while QEMU runs."""
        assert self.vm is not None
        model = self.case.oracle.model(self.vm)
        return [(n, b.name, b.granularity) for n, mn in sorted(model.nodes.items())
                for b in sorted(mn.bitmaps.values(), key=lambda b: b.name)
                if "(" not in b.name]

    def stored_bitmaps(self, node: str) -> list[str]:
        image = self.case.oracle.images.get(self.case.path(self.file(node)).resolve())
        return sorted(image.bitmaps) if image is not None else []

    def last_dirty_granule(self, node: str) -> int | None:
        """The start of the granule holding the last byte any bitmap of ``node`` must
        have dirty (the model's word, not QEMU's), if it is not the first granule."""
        assert self.vm is not None
        mnode = self.case.oracle.model(self.vm).nodes.get(node)
        best: int | None = None
        for b in mnode.bitmaps.values() if mnode is not None else ():
            spans = list(b.required(mnode.size)) if mnode is not None else []
            if spans:
                end = spans[-1][0] + spans[-1][1]
                start = (end - 1) // b.granularity * b.granularity
                if start > 0 and (best is None or start > best):
                    best = start
        return best

    def read_only(self, node: str) -> bool:
        assert self.vm is not None
        g = self.case.oracle.views[self.vm.name].graph.get(node)
        return bool(g is not None and g.read_only)

    # -- the invariant ----------------------------------------------------------------------

    def check(self) -> None:
        """The oracle's check of every bitmap: live while QEMU runs, else on disk."""
        if self.running:
            assert self.vm is not None
            for node in sorted({n for n, _, _ in self.live_bitmaps()}):
                self.last_check = Stmt(Call.of("qio.check_live", Expr("vm", self.vm), node))
                self.error = None
                try:
                    self.case.check_live(self.vm, node, where="explore")
                except Exception as e:
                    self.error = e
                    raise
        else:
            for node in self.chain:
                if self.stored_bitmaps(node):
                    self.last_check = Stmt(Call.of("qio.check_disk", self.file(node)))
                    try:
                        self.case.check_disk(self.file(node), where="explore")
                    except Exception as e:
                        self.error = e
                        raise
        self.last_check = None

    def close(self, failed: bool) -> list[str]:
        return self.case.close(failed=failed)


#: the comment over the statements that undo what a failed step started
REST = "the rest of that step: undo what it started (once QEMU passes the line above)"


def failing_steps(w: World) -> list[Step]:
    """The steps of a failed example as a case replays them: the steps that ran, the one
    that was interrupted and then the rest of it that undoes what it had started (an
    export, a job: a case that passes that point then ends as cleanly as the step
    would have), and the check that failed (if it was a check)."""
    steps = list(w.steps)
    if w._pending:
        steps.append(Step("the step that failed", tuple(w._pending)))
        rest = tuple(s for group in reversed(w.undo) for s in group)
        if rest:
            steps.append(Step(REST, rest))
    if w.last_check is not None:
        steps.append(Step("the oracle's check that failed", (w.last_check,)))
    return steps
