"""The per-test transcript: the readable story that becomes a golden-file section.

Only what a case (or a harness helper acting for it) chooses to log goes here: QMP commands
and replies, the events that matter, tool output, bitmap states. Harness chatter goes to the
debug logs in the scratch directory instead, never into the transcript. Text filters run
when a line is added, so the stored text is already deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from harness.errors import TranscriptError
from harness.filters import DEFAULT_TEXT_FILTERS, TextFilter, apply, strip_timestamp
from harness.golden import is_section_header


def render_json(obj: Any, indent: int | None = None) -> str:
    """JSON with sorted keys inside, so the same object always renders the same way.

    The top level keeps its own order, so a command reads ``{"execute": ..., "arguments"``
    and an event ``{"event": ..., "data": ...}`` as in QEMU's documentation.
    """
    if isinstance(obj, dict):
        return json.dumps({k: _sorted(v) for k, v in obj.items()}, indent=indent)
    return json.dumps(_sorted(obj), indent=indent)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted(v) for v in obj]
    return obj


class Transcript:
    """Lines of filtered text for one test."""

    def __init__(self, filters: Iterable[TextFilter] = ()) -> None:
        self.filters: list[TextFilter] = [*filters, *DEFAULT_TEXT_FILTERS]
        self._lines: list[str] = []

    def add_filter(self, f: TextFilter) -> None:
        """Add a filter that runs before the default ones (e.g. a path placeholder)."""
        self.filters.insert(0, f)

    def log(self, text: str = "") -> None:
        """Add text (may be several lines), filtered."""
        for line in apply(self.filters, text).rstrip("\n").split("\n"):
            if is_section_header(line):
                raise TranscriptError(
                    f"transcript line looks like a golden section header: {line!r}")
            self._lines.append(line.rstrip())

    def heading(self, title: str) -> None:
        """A step heading; a blank line before it keeps the golden file readable."""
        if self._lines:
            self._lines.append("")
        self.log(f"--- {title} ---")

    def json(self, obj: Any, indent: int | None = None) -> None:
        self.log(render_json(obj, indent))

    def qmp_command(self, cmd: str, args: dict[str, Any], prefix: str = "") -> None:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.log(prefix + render_json(msg))

    def qmp_reply(self, reply: dict[str, Any], prefix: str = "") -> None:
        self.log(prefix + render_json(reply))

    def event(self, event: dict[str, Any], prefix: str = "") -> None:
        ev = strip_timestamp(event)
        ordered = {"event": ev.pop("event"), **ev}
        self.log(prefix + render_json(ordered))

    def text(self) -> str:
        return "\n".join(self._lines) + ("\n" if self._lines else "")

    def __len__(self) -> int:
        return len(self._lines)
