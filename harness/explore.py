"""Stateful exploration of dirty bitmaps: Hypothesis drives live QEMU, the oracle judges.

Hand-written cases replay what their authors thought of, on round disk sizes. Here a
Hypothesis ``RuleBasedStateMachine`` draws sequences of block-layer operations on a disk
whose size and cluster size are drawn too (sizes that are no multiple of the cluster size
or of 64 x granularity included): writes, zero writes and discards anywhere (unaligned,
the very last byte), bitmaps of any granularity (persistent or not, disabled), enable,
disable, clear, merge (across granularities and nodes), remove (also in a
``transaction``), external snapshots, active and intermediate commits, read-only and
read-write reopens, clean restarts, SIGKILL and restart, grow and shrink, push backups
with every sync and bitmap mode, offline ``qemu-img bitmap`` (also ``--merge`` from
another image) and ``convert --bitmaps`` (also ``--skip-broken-bitmaps``).

The invariant after every step is the oracle's (``harness/oracle.py``): every bitmap
checked live while QEMU runs, every stored bitmap checked in the image file while it does
not. A command QEMU refuses leaves the model unchanged (the oracle applies only what QEMU
accepted), so a refusal is an outcome, not a failure.

Every step is kept as the Python a case would write (:class:`Call` data, run by
:meth:`World.do`): what is printed after a failure is exactly what ran, in the
vocabulary of ``harness/actions.py``. Hypothesis shrinks a failure to a minimal sequence
and replays it last; that replay is printed as a ready-to-paste ``cases/test_*.py``.

Known QEMU bugs are avoided by the rules, not reported again: a merge always names at
least one source (the empty-list merge SIGSEGV of ``cases/test_bitmap_qmp.py``), no rule
migrates (the skip_store bug of ``cases/test_migration.py``), and the guest's active layer
is not reopened read-only (QEMU refuses it, and with persistent bitmaps the refusal leaves
them read-only: ``cases/test_reopen_refused.py``, found by this module).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from harness import actions, backup, block
from harness.errors import HarnessError, MachineError
from harness.session import Case, Environment
from harness.vm import VM

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
#: the guest's disk, where writes are issued (they land in the active layer)
DEVICE = actions.GUEST_DEVICE
#: more layers than this and a snapshot is not drawn (each costs a file and a node)
MAX_CHAIN = 3
#: more bitmaps than this on the disk and no add is drawn (each costs a check per step)
MAX_BITMAPS = 5

# -- the step encoding: pure, shrink-friendly -------------------------------------------------


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


def database_dir(qemu_version: str, env: dict[str, str] | None = None) -> Path:
    """Where ``qiotests explore`` keeps its example database: outside the repository, in
    ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/qiotests/explore/<QEMU version>``, so
    what one QEMU found is replayed first on the next run against it."""
    e = os.environ if env is None else env
    cache = Path(e.get("XDG_CACHE_HOME") or Path(e.get("HOME", "~")).expanduser() / ".cache")
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", qemu_version).strip("_") or "unknown"
    return cache / "qiotests" / "explore" / name


@dataclass(frozen=True)
class Expr:
    """A value the case computes (``qio.path("d0.qcow2")``): printed as ``text``."""

    text: str
    value: Any


#: what guest writes write (the bitmaps care where, not what)
PATTERN = Expr("0x5A", 0x5A)


@dataclass(frozen=True)
class Spread:
    """A list built from lists and items: ``[*blockdev(...), "-device", "..."]``; each
    item that is a Call is spread (``*``), any other is one element."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class Call:
    """One call a case makes, as data: ``func`` is a dotted name in the case's namespace
    (``vm.qmp_log``, ``writes``, ``qio.img.run``); arguments may be Calls, Exprs, lists,
    dicts and plain values."""

    func: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def of(func: str, *args: Any, **kwargs: Any) -> Call:
        return Call(func, args, tuple(kwargs.items()))

    def with_kwargs(self, **more: Any) -> Call:
        kept = tuple((k, v) for k, v in self.kwargs if k not in more)
        return Call(self.func, self.args, kept + tuple(more.items()))

    def without(self, *names: str) -> Call:
        return Call(self.func, self.args, tuple((k, v) for k, v in self.kwargs
                                                if k not in names))


@dataclass(frozen=True)
class Stmt:
    """A statement of a case: ``form`` holds ``{}`` where the call goes
    (``"{}"``, ``"vm = {}"``, ``"assert {} is None"``; ``"vm.args = {}"`` takes any value)."""

    call: Any
    form: str = "{}"


def source(value: Any) -> str:
    """Python source for a value of a step (ints of 4 KiB and more in hex)."""
    if isinstance(value, Call):
        parts = [source(a) for a in value.args]
        parts += [f"{k}={source(v)}" for k, v in value.kwargs]
        return f"{value.func}({', '.join(parts)})"
    if isinstance(value, Expr):
        return value.text
    if isinstance(value, Spread):
        return "[" + ", ".join(("*" if isinstance(v, Call) else "") + source(v)
                               for v in value.items) + "]"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return hex(value) if value >= 4096 else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        inner = ", ".join(source(v) for v in value)
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{source(k)}: {source(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no source form for {value!r}")


def stmt_source(s: Stmt) -> str:
    return s.form.format(source(s.call))


def stmt_lines(s: Stmt, indent: int = 4, width: int = 100) -> list[str]:
    """A statement as lines of at most ``width`` columns where it can: a call too long
    for one line gets one argument per line (recursively), as ruff wants it."""
    head, _, tail = s.form.partition("{}")
    lines = _wrapped(s.call, indent, width, head, tail)
    return lines


def _wrapped(value: Any, indent: int, width: int, head: str, tail: str) -> list[str]:
    pad = " " * indent
    one = f"{pad}{head}{source(value)}{tail}"
    if len(one) <= width:
        return [one]
    if isinstance(value, Call):
        items: list[tuple[str, Any]] = [("", a) for a in value.args]
        items += [(f"{k}=", v) for k, v in value.kwargs]
        opener, closer = f"{value.func}(", ")"
    elif isinstance(value, list) and value:
        items, opener, closer = [("", v) for v in value], "[", "]"
    elif isinstance(value, Spread):
        items = [("*" if isinstance(v, Call) else "", v) for v in value.items]
        opener, closer = "[", "]"
    else:
        return [one]
    out = [f"{pad}{head}{opener}"]
    for prefix, v in items:
        out += _wrapped(v, indent + 4, width, prefix, ",")
    out.append(f"{pad}{closer}{tail}")
    return out


@dataclass(frozen=True)
class Step:
    """One rule as it ran: its name (a comment in the printed case) and its statements."""

    rule: str
    stmts: tuple[Stmt, ...]


#: where each name a printed case uses is imported from
IMPORTS = {
    **dict.fromkeys(("writes", "guest_writes", "action", "bitmap_add", "add_target",
                     "del_target", "backup_job"), "harness.actions"),
    **dict.fromkeys(("blockdev", "qcow2_node"), "harness.block"),
    **dict.fromkeys(("nbd_server_start", "nbd_export_add", "nbd_export_del", "dirty_extents"),
                    "harness.backup"),
}


def _names(value: Any) -> Iterator[str]:
    if isinstance(value, Call):
        yield value.func.split(".")[0]
        for v in (*value.args, *(v for _, v in value.kwargs)):
            yield from _names(v)
    elif isinstance(value, list | tuple | Spread):
        for v in value.items if isinstance(value, Spread) else value:
            yield from _names(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _names(v)


def render_case(steps: Sequence[Step], failure: str = "", qemu: str = "",
                error: str = "OracleFailure", name: str = "test_found_by_explore") -> str:
    """A ``cases/test_*.py`` file that replays ``steps`` (the shrunk sequence). It says
    what failed and on which QEMU, and how to keep it as a known QEMU bug."""
    used = {n for s in steps for st_ in s.stmts for n in _names(st_.call)}
    by_module: dict[str, list[str]] = {}
    for n in sorted(used):
        if n in IMPORTS:
            by_module.setdefault(IMPORTS[n], []).append(n)
    first = failure.strip().splitlines()[0] if failure.strip() else "no failure"
    lines = ['"""Found by qiotests explore' + (f" on QEMU {qemu}" if qemu else "") + ".",
             "", _wrap(first, 88), "",
             "If QEMU is wrong, keep it as a known QEMU bug: decorate the test with",
             f"@pytest.mark.xfail(raises={error}, strict=False, reason=\"QEMU bug seen in "
             "<versions>: <why>\")", '"""', "", "import pytest", ""]
    if error in _ERRORS:
        by_module.setdefault("harness.errors", []).append(error)
    for module in sorted(by_module):
        names = ", ".join(by_module[module])
        noqa = "  # noqa: F401 (for the xfail marker)" if module == "harness.errors" else ""
        lines.append(f"from {module} import {names}{noqa}")
    lines += ["from harness.session import Case", "", "",
              "@pytest.mark.quick", f"def {name}(qio: Case) -> None:"]
    for s in steps:
        lines.append(f"    # {s.rule}")
        for x in s.stmts:
            lines += stmt_lines(x)
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> str:
    words, out, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        out.append(cur)
    return "\n".join(out)


# -- the world: one case context the rules act on ------------------------------------------


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
        self.sizes: dict[str, int] = {}  # each node's virtual size
        self.counter = 0
        self.running = False
        self.ns: dict[str, Any] = {"qio": self.case, **{n: getattr(actions, n) for n in (
            "guest_writes", "action", "bitmap_add", "add_target", "del_target", "backup_job")},
            "blockdev": block.blockdev, "qcow2_node": block.qcow2_node,
            **{n: getattr(backup, n) for n in (
                "nbd_server_start", "nbd_export_add", "nbd_export_del", "dirty_extents")}}
        self._pending: list[Stmt] = []
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

    def end_step(self, rule: str) -> None:
        if self._pending:
            self.steps.append(Step(rule, tuple(self._pending)))
        self._pending = []

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


# -- the state machine ---------------------------------------------------------------------

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
        if w.qmp("blockdev-backup", Call.of("backup_job", job, w.top, target, **kw)):
            w.job(job)
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
        if w.qmp("transaction", actions=[
                Call.of("bitmap_add", w.top, copy, gran, disabled=True),
                Call.of("action", "block-dirty-bitmap-merge", node=w.top, target=copy,
                        bitmaps=[src]),
                Call.of("action", "blockdev-backup", job_id=job, device=w.top, target=fleece,
                        sync="none")]):
            assert w.vm is not None
            sock = Expr('vm.socket_path.parent / "pull.nbd"',
                        w.vm.socket_path.parent / "pull.nbd")
            w.do(Stmt(Call.of("nbd_server_start", vm, sock)))
            w.do(Stmt(Call.of("nbd_export_add", vm, fleece, "pull", sock, copy), "export = {}"))
            export = Expr("export", w.ns["export"])
            off, n = region(w.size, from_end, distance, length)
            if during:
                w.do(Stmt(Call.of("guest_writes", vm, [(off, n)], PATTERN)))
            where = {"window": (off, n)} if window else {}
            w.do(Stmt(Call.of("qio.oracle.check_ranges", vm, w.top, copy, Call.of(
                "dirty_extents", Expr("qio.img", w.case.img), export, copy, **where),
                f"pulled {copy}", exact=False, **where)))
            w.do(Stmt(Call.of("nbd_export_del", vm, export)))
            w.qmp("nbd-server-stop")
            w.qmp("job-cancel", id=job)
            w.job(job)
            w.qmp("block-dirty-bitmap-remove", node=w.top, name=copy)
        w.qmp("blockdev-del", node_name=fleece)
        w.end_step(f"pull backup of {w.top}/{src}")

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


# -- running it --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much to explore: ``examples`` sequences of at most ``steps`` steps each, or
    (``minutes`` > 0) batches of them until the time is up. ``seed`` None: random;
    0: derandomized, the same sequences every run (as ``make check`` runs it)."""

    examples: int = 8
    steps: int = 12
    minutes: float = 0.0
    seed: int | None = 0
    database: Path | None = None


@dataclass
class Outcome:
    """What an exploration did and, if it failed, the shrunk case."""

    examples: int
    steps: int
    longest: int
    seconds: float
    checks: int = 0
    failure: str | None = None
    error: str = ""
    case: str = ""
    case_steps: int = 0

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        line = (f"{self.examples} examples, {self.steps} steps, {self.checks} bitmap checks "
                f"in {self.seconds:.0f} s ({self.rate:.2f} examples/s), longest sequence "
                f"{self.longest} steps")
        if self.failure is None:
            return f"explore: {line}: no failure"
        return (f"explore: {line}: FAILED ({self.error}), shrunk to {self.case_steps} "
                f"steps:\n{self.failure}\n\n--- a case to paste into cases/ ---\n{self.case}")


def failing_steps(w: World) -> list[Step]:
    """The steps of a failed example as a case replays them: the steps that ran, the one
    that was interrupted, and the check that failed (if it was a check)."""
    steps = list(w.steps)
    if w._pending:
        steps.append(Step("the step that failed", tuple(w._pending)))
    if w.last_check is not None:
        steps.append(Step("the oracle's check that failed", (w.last_check,)))
    return steps


def hypothesis_settings(budget: Budget, examples: int) -> settings:
    return settings(
        max_examples=examples, stateful_step_count=budget.steps, deadline=None,
        derandomize=budget.seed == 0, database=(
            DirectoryBasedExampleDatabase(str(budget.database))
            if budget.database is not None else None),
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        verbosity=Verbosity.quiet, print_blob=False)


def run(env: Environment, scratch: Path, budget: Budget,
        progress: Callable[[Context], None] | None = None) -> Outcome:
    """Explore against the QEMU of ``env``, in ``scratch`` (one subdirectory per example,
    removed when it passes). Returns the outcome; a failure carries the printed case."""
    global CONTEXT
    ctx = Context(env, Path(scratch), on_example=progress)
    CONTEXT = ctx
    scratch.mkdir(parents=True, exist_ok=True)
    deadline = ctx.started + budget.minutes * 60
    failure: BaseException | None = None
    try:
        batch = 0
        while True:
            batch += 1
            n = budget.examples if budget.minutes <= 0 else max(1, budget.examples)
            s = hypothesis_settings(budget, n)
            try:
                run_state_machine_as_test(BitmapMachine, settings=s)
            except BaseException as e:  # the shrunk failure, raised by its last replay
                if isinstance(e, KeyboardInterrupt | SystemExit):
                    raise
                failure = e
                break
            if budget.minutes <= 0 or time.monotonic() >= deadline:
                break
    finally:
        CONTEXT = None
    out = Outcome(ctx.examples, ctx.steps, ctx.longest, time.monotonic() - ctx.started,
                  ctx.checks)
    if failure is not None:
        shown = ctx.last
        if isinstance(failure, Flaky) and ctx.smallest is not None \
                and ctx.smallest.error is not None:
            # QEMU did not replay a sequence the same way (Hypothesis gave up shrinking):
            # print the smallest failing sequence actually seen, with its own error
            shown = ctx.smallest
            failure = ctx.smallest.error
        steps = failing_steps(shown) if shown is not None else []
        out.failure = f"{type(failure).__name__}: {failure}"
        out.error = type(failure).__name__
        out.case_steps = sum(1 for s in steps if s.rule != "the oracle's check that failed")
        out.case = render_case(steps, out.failure, env.probe.version,
                               error=out.error if out.error in _ERRORS else "Exception")
    return out


#: exception classes a printed case can name in its xfail marker (harness.errors)
_ERRORS = ("OracleFailure", "MachineExitError", "CommandError", "MachineError",
           "ToolError", "LaunchError", "MachineTimeout")

