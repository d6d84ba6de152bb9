"""Running an exploration: its budget, Hypothesis's settings, the outcome and the case
printed for a failure."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test

from harness.explore import rules
from harness.explore.rules import BitmapMachine, Context
from harness.explore.steps import ERRORS, render_case
from harness.explore.world import REST, failing_steps
from harness.session import Environment


def database_dir(qemu_version: str, env: dict[str, str] | None = None) -> Path:
    """Where ``qiotests explore`` keeps its example database: outside the repository, in
    ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/qiotests/explore/<QEMU version>``, so
    what one QEMU found is replayed first on the next run against it."""
    e = os.environ if env is None else env
    cache = Path(e.get("XDG_CACHE_HOME") or Path(e.get("HOME", "~")).expanduser() / ".cache")
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", qemu_version).strip("_") or "unknown"
    return cache / "qiotests" / "explore" / name


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
    ctx = Context(env, Path(scratch), on_example=progress)
    rules.CONTEXT = ctx
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
        rules.CONTEXT = None
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
        out.case_steps = sum(1 for s in steps
                             if s.rule not in ("the oracle's check that failed", REST))
        out.case = render_case(steps, out.failure, env.probe.version,
                               error=out.error if out.error in ERRORS else "Exception")
    return out
