"""Two push backups of one node, started in one transaction, ending at different times.

Each ``blockdev-backup`` puts its own copy-before-write filter above the source, so after
the transaction the graph is ``cbw-a -> cbw-b -> drive0``. When a job ends, its filter is
dropped from the graph (``bdrv_drop_filter``) while the other job may still be copying,
or may be ending too. That is what ``test_257.py::test_incremental_and_differential``
does once per round (an incremental and a differential backup from one point in time);
this module is the same graph change with nothing else around it: no bitmaps, no guest
writes during the jobs, plain ``sync: full`` backups, repeated so that a race shows.

Each round checks what a user would: both jobs conclude without error, QEMU is still
running, and both targets hold exactly what the source held (``qemu-img compare``).

The known bug (QEMU 10.2.2; not 10.0.x or 7.2): job ``a`` ends first and, in its clean-up,
``bdrv_drop_filter(cbw-a)`` reads its child (``cbw-b``) and then drains it. The drain
polls, and ``b``, which has just finished copying, completes inside that poll: its own
clean-up replaces ``cbw-b`` by ``drive0`` under ``cbw-a``, undrains ``drive0`` (which
undrains ``cbw-a`` with it) and frees ``cbw-b``. Back in ``a``, ``bdrv_replace_node_common``
is called with ``from`` no longer drained and ``to`` freed, and aborts on ``Assertion
`from->quiesce_counter' failed`` (block.c:5423). Each round is one chance for that race,
hence the rounds.
"""

from __future__ import annotations

import pytest

from harness.actions import action, backup_job, writes
from harness.backup import create_target, target_node
from harness.errors import MachineExitError
from harness.session import Case
from harness.vm import VM

pytestmark = pytest.mark.quick

SIZE = 4 << 20
NODE = "drive0"
ROUNDS = 10
DATA = ((0, 0x10000), (0x100000, 0x30000), (0x3F0000, 0x10000))
KNOWN_BUG = ("QEMU bug seen in 10.2.2, not in 10.0.2, 10.0.13 or 7.2.22: when the first of two "
             "backups of one node started in one transaction ends, bdrv_drop_filter aborts "
             "(block.c:5423 Assertion 'from->quiesce_counter' failed) in 12 of 30 single "
             "transactions, 20 of 20 runs of 10 rounds")


def one_round(qio: Case, vm: VM, n: int, log: bool) -> None:
    """Targets a<n> and b<n>, both backups in one transaction, a waited for first."""
    jobs = (f"a{n}", f"b{n}")
    for job in jobs:
        create_target(qio.img, f"{job}.qcow2", SIZE)
        args = target_node(qio.path(f"{job}.qcow2"), job)
        if log:
            vm.qmp_log("blockdev-add", args)
        else:
            vm.qmp("blockdev-add", args)
    actions = [action("blockdev-backup", **backup_job(job, NODE, job, sync="full"))
               for job in jobs]
    if log:
        vm.qmp_log("transaction", actions=actions)
    else:
        vm.qmp("transaction", actions=actions)
    for job in jobs:
        assert vm.run_job(job, log=log) is None
    for job in jobs:
        vm.qmp("blockdev-del", node_name=job)
    vm.qemu_io(NODE, "flush")
    for job in jobs:
        qio.img.run("compare", "-U", "src.qcow2", f"{job}.qcow2", log=log)


@pytest.mark.xfail(raises=MachineExitError, strict=False, reason=KNOWN_BUG)
def test_two_full_backups_in_one_transaction(qio: Case) -> None:
    vm = qio.vm_on("src.qcow2", NODE, create=SIZE, launch=True)
    writes(vm, NODE, DATA)
    qio.log.heading("round 0: targets a0 and b0, both backups in one transaction")
    one_round(qio, vm, 0, log=True)
    qio.log.heading(f"rounds 1 to {ROUNDS - 1}: the same, unlogged; each must end like round 0")
    for n in range(1, ROUNDS):
        one_round(qio, vm, n, log=False)
    qio.log.log(f"{ROUNDS - 1} more rounds: every job concluded, every target equals the source")
    vm.shutdown()
