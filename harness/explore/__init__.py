"""Stateful exploration of dirty bitmaps: Hypothesis drives live QEMU, the oracle judges.

Hand-written cases replay what their authors thought of, on round disk sizes. Here a
Hypothesis ``RuleBasedStateMachine`` draws sequences of block-layer operations on a disk
whose size and cluster size are drawn too (sizes that are no multiple of the cluster size
or of 64 x granularity included): writes, zero writes and discards anywhere (unaligned,
the very last byte), bitmaps of any granularity (persistent or not, disabled), enable,
disable, clear, merge (across granularities and nodes), remove (also in a
``transaction``), external snapshots, active and intermediate commits, read-only and
read-write reopens, clean restarts, SIGKILL and restart, grow and shrink, push backups
with every sync and bitmap mode, pull backups, mirrors, guest requests that fail with an
I/O error (``blkdebug`` under the active layer), offline ``qemu-img bitmap`` (also ``--merge`` from
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

The package, one module per concern: :mod:`~harness.explore.steps` (the steps as data
and the case file they print as; pure), :mod:`~harness.explore.world` (one example's case
context, the chain and the oracle's check), :mod:`~harness.explore.rules` (the state
machine: what is drawn and done), :mod:`~harness.explore.runner` (budgets, Hypothesis's
settings, the outcome).
"""

from harness.explore.rules import BitmapMachine, Context, region, resized
from harness.explore.runner import Budget, Outcome, database_dir, run
from harness.explore.steps import Call, Expr, Spread, Step, Stmt, render_case, source, stmt_lines
from harness.explore.world import World, failing_steps

__all__ = ["BitmapMachine", "Budget", "Call", "Context", "Expr", "Outcome", "Spread", "Step",
           "Stmt", "World", "database_dir", "failing_steps", "region", "render_case",
           "resized", "run", "source", "stmt_lines"]
