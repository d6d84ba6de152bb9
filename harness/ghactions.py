"""GitHub Actions reports: annotations on the case's line, and a step summary table.

When ``GITHUB_ACTIONS=true`` the plugin's controller (the only process that sees every
test's report under ``-n``) prints one ``::error file=...,line=...::`` workflow command per
failing test, so the failure shows on the pull request's diff at the line of the case that
failed (the deepest frame in the case module, not inside the harness), and appends a
Markdown table (test, outcome, one-line reason, time) to ``$GITHUB_STEP_SUMMARY``.

``pytest-github-actions-annotate-failures`` was tried instead: for a harness error (whose
report is the short text of ``harness.report``, not a traceback) it puts the annotation on
the test's ``def`` line, so it is not used.

The worker that ran a test stores the location and the reason on its report
(``WHERE_ATTR``, ``REASON_ATTR``): plain attributes that xdist carries to the controller.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.report import one_line

WHERE_ATTR = "qio_where"
REASON_ATTR = "qio_reason"
ANNOTATION_LINES = 40
XDIST_HEADER = re.compile(r"^\[gw\d+\] \S+ -- Python ")
#: outcome -> (order in the table, mark)
OUTCOMES = {
    "failed": (0, "❌"),
    "error": (1, "💥"),
    "xpassed": (2, "❔"),
    "xfailed": (3, "🔸"),
    "skipped": (4, "⏭️"),
    "passed": (5, "✅"),
}


def enabled(env: Mapping[str, str]) -> bool:
    """GitHub sets ``GITHUB_ACTIONS=true`` in every step of a workflow run."""
    return env.get("GITHUB_ACTIONS") == "true"


def escape_data(text: str) -> str:
    """A workflow command's message: ``%``, CR and LF escaped (GitHub's toolkit rules)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: also ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def error_command(file: str, line: int, title: str, message: str) -> str:
    """``::error file=F,line=L,title=T::MESSAGE``, escaped."""
    return (f"::error file={escape_property(file)},line={line},"
            f"title={escape_property(title)}::{escape_data(message)}")


@dataclass
class TestResult:
    """One test's phases merged: the outcome a person would name, time, why."""

    nodeid: str
    outcome: str = "passed"
    duration: float = 0.0
    reason: str = ""
    where: tuple[str, int] | None = None
    text: str = ""


def _report_reason(rep: Any) -> str:
    reason = getattr(rep, REASON_ATTR, None)
    if reason:
        return str(reason)
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return one_line(str(longrepr[2]).removeprefix("Skipped: "))
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return one_line(str(crash.message))
    return one_line(str(longrepr or ""))


@dataclass
class Results:
    """Every test's result, fed with pytest's reports as they come in."""

    tests: dict[str, TestResult] = field(default_factory=dict)

    def add(self, rep: Any) -> None:
        """Merge one phase's report (setup, call, teardown) into its test's result."""
        r = self.tests.setdefault(rep.nodeid, TestResult(rep.nodeid))
        r.duration += float(getattr(rep, "duration", 0.0) or 0.0)
        xfail = getattr(rep, "wasxfail", None)
        if rep.failed:
            if r.outcome not in ("failed", "error"):  # the first failure says why
                r.outcome = "failed" if rep.when == "call" else "error"
                r.reason = _report_reason(rep)
                r.text = str(rep.longreprtext)
                where = getattr(rep, WHERE_ATTR, None)
                if where:
                    r.where = (str(where[0]), int(where[1]))
                else:
                    path, lineno, _ = rep.location
                    r.where = (str(path), (lineno or 0) + 1)
        elif rep.skipped and r.outcome == "passed":
            r.outcome = "xfailed" if xfail is not None else "skipped"
            r.reason = ("xfail: " + one_line(str(xfail))) if xfail is not None \
                else _report_reason(rep)
        elif rep.when == "call" and rep.passed and xfail is not None:
            r.outcome = "xpassed"
            r.reason = one_line(str(xfail))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.tests.values():
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    def annotations(self, rootdir: Path, workspace: str | None) -> list[str]:
        """One ``::error`` command per failed or errored test, on the case's line; the
        file relative to ``GITHUB_WORKSPACE`` (the checkout) when it lies inside it."""
        out = []
        for r in self.tests.values():
            if r.outcome not in ("failed", "error") or r.where is None:
                continue
            file, line = r.where
            path = rootdir / file
            if workspace and path.resolve().is_relative_to(Path(workspace).resolve()):
                file = os.path.relpath(path.resolve(), Path(workspace).resolve())
            # xdist starts a report with "[gw0] linux -- Python ...": not the failure
            lines = [ln for ln in r.text.splitlines() if not XDIST_HEADER.match(ln)]
            body = "\n".join(lines[:ANNOTATION_LINES])
            if len(lines) > ANNOTATION_LINES:
                body += f"\n... ({len(lines) - ANNOTATION_LINES} more lines in the job log)"
            out.append(error_command(file, line, f"{r.nodeid} {r.outcome}", body or r.reason))
        return out

    def markdown(self, heading: str = "qiotests", notes: tuple[str, ...] = ()) -> str:
        """The step summary: a heading with the counts, notes, then the table with
        failures first."""
        counts = self.counts()
        said = ", ".join(f"{n} {o}" for o, n in sorted(counts.items(),
                                                       key=lambda kv: OUTCOMES[kv[0]][0]))
        total = sum(r.duration for r in self.tests.values())
        lines = [f"### {heading}: {said or 'no tests'} ({total:.1f} s of test time)", ""]
        lines += [f"{n}  " for n in notes]
        if notes:
            lines.append("")
        lines += ["| test | outcome | reason | time |", "| --- | --- | --- | ---: |"]
        ordered = sorted(self.tests.values(), key=lambda r: (OUTCOMES[r.outcome][0], r.nodeid))
        for r in ordered:
            reason = r.reason.replace("|", "\\|").replace("`", "'")
            lines.append(f"| `{r.nodeid}` | {OUTCOMES[r.outcome][1]} {r.outcome} | {reason} "
                         f"| {r.duration:.2f} s |")
        return "\n".join(lines) + "\n\n"


def append_summary(path: str, text: str) -> None:
    """Append to ``$GITHUB_STEP_SUMMARY`` (several pytest runs in one step add up)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
