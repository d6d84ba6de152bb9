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

import pytest

from harness import explore
from harness.session import Environment

#: sized so that this test adds at most 30 s to ``make check`` with ``-n 2`` (measured in the
#: README) and still meets the planted bugs truncate-rounds-down and discard-not-dirty
#: (docs/planted-bugs.md)
BUDGET = explore.Budget(examples=12, steps=8, seed=0)


@pytest.mark.timeout(900)  # a failure is shrunk: Hypothesis replays many more sequences
def test_bounded_exploration(qio_env: Environment, tmp_path: Path) -> None:
    out = explore.run(qio_env, tmp_path / "explore", BUDGET)
    assert out.failure is None, out.summary()
