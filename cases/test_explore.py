"""A bounded, derandomized run of the stateful exploration (harness/explore/).

Hypothesis draws the same sequences every run (``derandomize``): writes, zero writes and
discards anywhere on a disk of a drawn size, bitmaps of any granularity, merges, snapshots,
commits, reopens, restarts, crashes, resizes, backups, offline qemu-img. After every step
the oracle checks every bitmap. A failure is shrunk and the message is a case file to
paste into ``cases/``. ``make explore MINUTES=N`` runs the same rules for longer, at random.
There is no golden section: the sequences are Hypothesis's, the verdict is the oracle's.
"""

from __future__ import annotations

from pathlib import Path

from harness import explore
from harness.session import Environment

#: sized so that this test adds well under 30 s to ``make check`` (measured in the README)
BUDGET = explore.Budget(examples=16, steps=12, seed=0)


def test_bounded_exploration(qio_env: Environment, tmp_path: Path) -> None:
    out = explore.run(qio_env, tmp_path / "explore", BUDGET)
    assert out.failure is None, out.summary()
