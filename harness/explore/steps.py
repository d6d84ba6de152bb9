"""The steps of an exploration as data, and the case file they print as.

Every step a rule takes is kept as the Python a case would write (:class:`Call` data,
run by :class:`harness.explore.world.World`): what is printed after a failure is exactly
what ran, in the vocabulary of ``harness/actions.py``. Pure: no QEMU, no Hypothesis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Expr:
    """A value the case computes (``qio.path("d0.qcow2")``): printed as ``text``."""

    text: str
    value: Any


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
    if error in ERRORS:
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


#: exception classes a printed case can name in its xfail marker (harness.errors)
ERRORS = ("OracleFailure", "MachineExitError", "CommandError", "MachineError",
           "ToolError", "LaunchError", "MachineTimeout")
