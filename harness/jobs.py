"""Block jobs driven to their end, the way iotests' ``run_job`` does it.

A job is started by the case with a plain QMP command (``blockdev-backup``,
``block-commit``, ``blockdev-mirror``...); :func:`run_job` then follows its events until
it is gone. It needs no copy of the job's ``auto-finalize``/``auto-dismiss`` settings:
when a job waits in ``pending`` or ``concluded``, ``query-jobs`` says so and the job is
finalized or dismissed here, after its error has been read (with ``auto-dismiss: false``
that error is still there to read; with QEMU's default the job is gone by then and the
error comes from its ``BLOCK_JOB_COMPLETED`` event).

The oracle sees the same events through the VM's observer, so a job's outcome
reaches the model without the case saying anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from harness.errors import MachineTimeout

if TYPE_CHECKING:
    from harness.vm import VM

JOB_EVENTS = (
    "JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING",
)


def run_job(
    vm: VM,
    job_id: str,
    *,
    complete: bool = False,
    cancel: bool = False,
    dismiss: bool = True,
    timeout: float = 60.0,
    log: bool = True,
    on_ready: Callable[[], None] | None = None,
    on_pending: Callable[[], None] | None = None,
) -> str | None:
    """Drive a started job to its end; return its error message or None.

    ``complete`` sends ``job-complete`` when the job is ready (mirror, active commit),
    after ``on_ready`` has run (e.g. guest writes while the job mirrors them); ``cancel``
    sends ``job-cancel`` instead. A job waiting in ``pending`` (``auto-finalize: false``)
    is finalized after ``on_pending``; one waiting in ``concluded`` is dismissed unless
    ``dismiss`` is false (then this returns at ``concluded``). With ``log`` the
    BLOCK_JOB_* events and a summary of the status changes go to the transcript.
    """
    def ours(ev: dict[str, Any]) -> bool:
        data = ev.get("data", {})
        return bool(data.get("id", data.get("device")) == job_id)

    statuses: list[str] = []
    error: str | None = None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            ev = vm.event_wait(JOB_EVENTS, timeout=max(left, 0.0), match=ours)
        except MachineTimeout as e:
            last = statuses[-1] if statuses else "no status change seen"
            hint = {"ready": " (a ready job waits for job-complete: pass complete=True)",
                    "pending": " (it waits for job-finalize)",
                    "concluded": " (it waits for job-dismiss)"}.get(last, "")
            raise MachineTimeout(vm.name, f"job {job_id} did not finish within "
                                 f"{timeout:g} s; last status: {last}{hint}",
                                 vm.argv, None, e.log_tail) from None
        if ev["event"] != "JOB_STATUS_CHANGE":
            # BLOCK_JOB_* events come right after their status change: log, then act,
            # so the transcript shows READY before the job-complete it triggers
            if log and vm.transcript is not None:
                vm.transcript.event(ev, vm.log_prefix)
            if (ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                    and "error" in ev.get("data", {})):
                error = str(ev["data"]["error"])
            if ev["event"] == "BLOCK_JOB_READY":
                if on_ready is not None:
                    on_ready()
                if cancel:
                    _job_cmd(vm, "job-cancel", job_id, log)
                elif complete:
                    _job_cmd(vm, "job-complete", job_id, log)
            elif ev["event"] == "BLOCK_JOB_PENDING" and _waits(vm, job_id, "pending"):
                if on_pending is not None:
                    on_pending()
                _job_cmd(vm, "job-finalize", job_id, log)
            continue
        status = ev["data"]["status"]
        statuses.append(status)
        if status == "concluded":
            job = _waits(vm, job_id, "concluded")
            if job is not None:
                if "error" in job and error is None:
                    error = str(job["error"])
                if not dismiss:
                    break
                _job_cmd(vm, "job-dismiss", job_id, log)
        elif status == "null":
            break
    if log and vm.transcript is not None:
        summary = " -> ".join(_summarise(statuses))
        vm.transcript.log(f"{vm.log_prefix}job {job_id}: {summary}")
    return error


def _waits(vm: VM, job_id: str, status: str) -> dict[str, Any] | None:
    """The job's ``query-jobs`` entry if it still sits in ``status`` (it waits for us)."""
    for job in vm.qmp("query-jobs"):
        if job["id"] == job_id and job["status"] == status:
            return dict(job)
    return None


def _job_cmd(vm: VM, cmd: str, job_id: str, log: bool) -> None:
    if log and vm.transcript is not None:
        vm.transcript.qmp_command(cmd, {"id": job_id}, vm.log_prefix)
    vm.qmp(cmd, id=job_id)


def _summarise(statuses: list[str]) -> list[str]:
    """Status changes without the pauses that drains cause at random.

    A drain moves a running job to ``paused`` and a ready one to ``standby`` and back; how
    many times depends on timing (it differs between QEMU 7.2 and 10.0), so those states
    are dropped and the repeats they leave are folded.
    """
    out: list[str] = []
    for s in statuses:
        if s in ("paused", "standby"):
            continue
        if out and out[-1] == s:
            continue
        out.append(s)
    return out
