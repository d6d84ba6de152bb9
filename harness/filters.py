"""Named filters that make QEMU output deterministic.

Each filter is a pure function: ``str -> str`` for text, or ``dict -> new dict`` for QMP
messages (the input is never modified). Names say what they replace, and the replacement
is a visible placeholder (``TEST_DIR``, ``NODE_ID``) so a golden file shows what was hidden.
Filters that depend on a run (a scratch path) are built by a factory that escapes the path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any

TextFilter = Callable[[str], str]


def path_filter(path: str, placeholder: str) -> TextFilter:
    """Replace every occurrence of ``path`` (a literal, escaped) with ``placeholder``."""
    pattern = re.compile(re.escape(path.rstrip("/")))

    def replace_path(text: str) -> str:
        return pattern.sub(placeholder, text)

    replace_path.__name__ = f"filter_{placeholder}"
    return replace_path


_QEMU_IO_RATE = re.compile(
    r"^(?P<size>[\d.]+ \w+), (?P<ops>[\d.]+) ops; [\d:.]+(?: sec)? "
    r"\([^)]*/sec and [\d.]+ ops/sec\)$",
    re.M,
)


def qemu_io_timings(text: str) -> str:
    """qemu-io's "64 KiB, 1 ops; 00.00 sec (...)" lines: keep size and ops, drop rates.

    An operation of a second or more prints ``0:00:01.10`` without ``sec``.
    """
    return _QEMU_IO_RATE.sub(r"\g<size>, \g<ops> ops; XX.XX sec (XXX/sec and XXX ops/sec)", text)


_NODE_ID = re.compile(r"#block\d+")


def node_ids(text: str) -> str:
    """Generated node names (``#block123``) depend on how many nodes came before."""
    return _NODE_ID.sub("#blockNNN", text)


_TIMESTAMP = re.compile(
    r'"timestamp": \{\s*"(?:micro)?seconds": \d+,\s*"(?:micro)?seconds": \d+\s*\}'
)


def timestamps(text: str) -> str:
    """QMP event timestamps rendered as JSON, in either key order (QEMU sends seconds
    first; sorted JSON puts microseconds first)."""
    return _TIMESTAMP.sub('"timestamp": {"microseconds": "USECS", "seconds": "SECS"}', text)


_VERSION = re.compile(r"\b(version) \d+\.\d+\.\d+(?: \([^)\n]*\))?")


def qemu_version(text: str) -> str:
    """``version 7.2.22 (Debian 1:7.2+dfsg-7)`` -> ``version QEMU_VERSION``."""
    return _VERSION.sub(r"\1 QEMU_VERSION", text)


def strip_timestamp(msg: dict[str, Any]) -> dict[str, Any]:
    """A copy of a QMP event without its ``timestamp`` member."""
    out = copy.deepcopy(msg)
    out.pop("timestamp", None)
    return out


def drop_keys(msg: Any, keys: Iterable[str]) -> Any:
    """A deep copy of ``msg`` without the given keys at any depth (e.g. ``busy``)."""
    drop = frozenset(keys)

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items() if k not in drop}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(msg)


def apply(filters: Iterable[TextFilter], text: str) -> str:
    """Run text filters in order."""
    for f in filters:
        text = f(text)
    return text


#: Filters every transcript gets, in this order.
DEFAULT_TEXT_FILTERS: tuple[TextFilter, ...] = (qemu_io_timings, node_ids, timestamps, qemu_version)
