"""Block-layer conveniences over one VM: node options, qemu-io over HMP, reopen.

These are what iotests' ``VM`` (here :class:`harness.vm.VM`) adds on top of the process:
each is a plain QMP command underneath, sent through :meth:`Machine.qmp` so the oracle
sees it like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import MachineError, MachineStateError
from harness.machine import tail

if TYPE_CHECKING:
    from harness.vm import VM


def blockdev(options: dict[str, Any]) -> list[str]:
    """``-blockdev`` arguments in JSON form, so any option tree can be given as a dict."""
    return ["-blockdev", json.dumps(options)]


def qcow2_node(path: str | Path, node: str, read_only: bool = False,
               file_node: str | None = None, **extra: Any) -> dict[str, Any]:
    """Options for a qcow2 node over a file node, as ``-blockdev`` or ``blockdev-add`` take.

    ``file_node`` names the file node (QEMU makes up a name otherwise), for a filter to be
    put between the two later (a ``blkdebug`` that injects I/O errors). ``extra`` keywords
    are QMP names with ``_`` for ``-`` (``backing=None``)."""
    opts: dict[str, Any] = {
        "driver": "qcow2", "node-name": node,
        "file": {"driver": "file", "filename": str(path)},
    }
    if file_node is not None:
        opts["file"]["node-name"] = file_node
    if read_only:
        opts["read-only"] = True
    opts.update({k.replace("_", "-"): v for k, v in extra.items()})
    return opts


def blockdev_reopen(vm: VM, options: dict[str, Any], log: bool = True,
                    expect_error: str | bool = False) -> dict[str, Any]:
    """Reopen one node with new options: ``blockdev-reopen`` (6.1+, takes a list) or
    ``x-blockdev-reopen`` (older, takes the options directly). Returns the reply; an
    error reply raises unless ``expect_error`` (see :meth:`VM.qmp_log`)."""
    if vm.has_command("blockdev-reopen"):
        cmd, args = "blockdev-reopen", {"options": [options]}
    elif vm.has_command("x-blockdev-reopen"):
        cmd, args = "x-blockdev-reopen", dict(options)
    else:
        raise MachineStateError(vm.name, "this QEMU has neither blockdev-reopen nor "
                                "x-blockdev-reopen")
    if log:
        return vm.qmp_log(cmd, args, expect_error=expect_error)
    reply = vm.qmp_raw(cmd, args)
    if "error" in reply and not expect_error:
        vm.qmp(cmd, args)  # raises the CommandError with the context
    return reply


def qemu_io(vm: VM, target: str, command: str, log: bool = False,
            device: bool = False, check: bool = True) -> str:
    """Run one qemu-io command on a node (or a device with ``device=True``) via HMP.

    QEMU prints qemu-io's output on its stdout, not in the HMP reply, so the output is
    what the VM log gained during the call. ``check`` raises when qemu-io reports a
    failed request (QEMU itself exits 0 either way). The oracle sees the HMP command and
    models the write where it lands (following the device to its active layer).
    """
    where = f"-d {target}" if device else target
    quoted = command.replace("\\", "\\\\").replace('"', '\\"')
    before = vm.log_path.stat().st_size if vm.log_path.exists() else 0
    reply = vm.hmp(f'qemu-io {where} "{quoted}"')
    with open(vm.log_path, "rb") as f:
        f.seek(before)
        out = reply + f.read().decode(errors="replace")
    if log and vm.transcript is not None:
        vm.transcript.log(f"{vm.log_prefix}qemu-io {target}: {command}")
        if out.strip():
            vm.transcript.log(out)
    if check:
        failed = qemu_io_failures(reply, out)
        if failed:
            raise MachineError(vm.name, f"qemu-io {target} {command!r}: {failed[0]}"
                               f"{vm.limit_note()}", vm.argv, None, tail(vm.log_path))
    return out


def qemu_io_failures(reply: str, output: str) -> list[str]:
    """The lines that say an HMP qemu-io command failed. The HMP reply is empty on
    success, so anything there is an error of the monitor command itself (unknown node,
    permission conflict); a failed request says "failed" on QEMU's stdout."""
    failed = [ln for ln in reply.splitlines() if ln.strip()]
    failed += [ln for ln in output.splitlines() if "failed" in ln]
    return failed
