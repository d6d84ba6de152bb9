"""harness.tools: ToolError, qemu-img's JSON helpers, qemu-io and qemu-nbd, on real programs."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import ToolError, describe_status, format_argv
from harness.machine import short_socket_dir
from harness.processes import REGISTRY
from harness.tools import QemuImg, QemuIO, QemuNBD
from harness.transcript import Transcript
from tests.conftest import fake_program, process_alive

pytestmark = pytest.mark.usefixtures("no_leftovers")


def which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH (apt-get install qemu-utils)")
    return path


@pytest.fixture
def img(tmp_path: Path) -> QemuImg:
    return QemuImg(which("qemu-img"), tmp_path, Transcript([]))


@pytest.fixture
def qio(tmp_path: Path) -> QemuIO:
    return QemuIO(which("qemu-io"), tmp_path, Transcript([]))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = short_socket_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_tool_error_message() -> None:
    e = ToolError(["/usr/bin/qemu-img", "info", "/tmp/my disk.qcow2"], 1, "",
                  "qemu-img: Could not open '/tmp/my disk.qcow2': No such file or directory\n")
    msg = str(e)
    assert msg.splitlines() == [
        "qemu-img failed (exit status 1): qemu-img: Could not open '/tmp/my disk.qcow2': "
        "No such file or directory",
        "  command: /usr/bin/qemu-img info '/tmp/my disk.qcow2'",
    ]
    assert (e.argv, e.status) == (["/usr/bin/qemu-img", "info", "/tmp/my disk.qcow2"], 1)
    many = "\n".join(f"line {i}" for i in range(30))
    msg = str(ToolError(["qemu-io"], -9, many, ""))
    assert "killed by SIGKILL" in msg and "line 29" in msg and "line 19" not in msg
    assert "(no output)" in str(ToolError(["qemu-nbd"], 2, "", ""))


def test_describe_status_and_format_argv() -> None:
    assert describe_status(None) == "did not finish"
    assert describe_status(None, running=True) == "still running"
    assert describe_status(0) == "exit status 0"
    assert describe_status(-6) == "killed by SIGABRT"
    assert format_argv(["qemu-io", "-c", "write -P 0x11 0 64k", "a b.qcow2"]) == (
        "qemu-io -c 'write -P 0x11 0 64k' 'a b.qcow2'")


def test_failing_qemu_img_raises_with_its_stderr(img: QemuImg, tmp_path: Path) -> None:
    with pytest.raises(ToolError) as ei:
        img.info("missing.qcow2")
    e = ei.value
    assert e.status == 1
    assert "Could not open 'missing.qcow2'" in e.stderr
    assert str(e).startswith("qemu-img failed (exit status 1): qemu-img: Could not open")
    assert f"command: {img.path} info missing.qcow2 --output=json" in str(e)
    # every run is in tools.log, failed or not
    log = (tmp_path / "tools.log").read_text()
    assert "info missing.qcow2 --output=json" in log and "status 1" in log


def test_qemu_img_json_helpers(img: QemuImg, tmp_path: Path) -> None:
    path = img.create("a.qcow2", "1M")
    assert path == tmp_path / "a.qcow2"
    img.run("bitmap", "--add", "--granularity", "128k", "a.qcow2", "b0")
    img.run("bitmap", "--add", "--disable", "a.qcow2", "b1")
    info = img.info("a.qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 20
    bitmaps = {b["name"]: b for b in img.bitmaps("a.qcow2")}
    assert bitmaps["b0"]["granularity"] == 128 * 1024 and bitmaps["b0"]["flags"] == ["auto"]
    assert bitmaps["b1"]["flags"] == []
    status, report = img.check("a.qcow2")
    assert status == 0 and report["check-errors"] == 0 and "corruptions" not in report


def test_qemu_img_backing_chain(img: QemuImg) -> None:
    img.create("base.qcow2", "1M")
    img.create("top.qcow2", "", backing="base.qcow2")
    chain = img.info("top.qcow2", backing_chain=True)
    assert [i["filename"] for i in chain] == ["top.qcow2", "base.qcow2"]
    assert img.bitmaps("base.qcow2") == []


def test_qemu_img_check_reports_corruption_as_data(img: QemuImg, qio: QemuIO) -> None:
    img.create("lazy.qcow2", "1M", "qcow2", "lazy_refcounts=on")
    # qemu-io's 'abort' leaves the lazy refcounts unwritten: a corrupt image
    with pytest.raises(ToolError, match="killed by SIGABRT"):
        qio.io("lazy.qcow2", "write 0 64k", "abort")
    status, report = img.check("lazy.qcow2")
    assert status == 2 and report["corruptions"] > 0


def test_qemu_img_check_on_a_format_without_checks_raises(img: QemuImg) -> None:
    img.create("a.raw", "1M", "raw")
    with pytest.raises(ToolError, match="does not support checks") as ei:
        img.check("a.raw", "-f", "raw")
    assert ei.value.status == 63


def test_qemu_io_output_and_failures(qio: QemuIO, img: QemuImg) -> None:
    img.create("a.qcow2", "1M")
    out = qio.io("a.qcow2", "write -P 0x11 0 64k", "read -P 0x11 0 64k")
    assert out.startswith("wrote 65536/65536 bytes at offset 0\n")
    assert "read 65536/65536 bytes at offset 0" in out
    with pytest.raises(ToolError, match="Pattern verification failed"):
        qio.io("a.qcow2", "read -P 0x22 0 4k")
    out = qio.io("a.qcow2", "write 1M 4k", check=False)
    assert "write failed: Input/output error" in out


def test_qemu_io_log_writes_the_filtered_story(qio: QemuIO, img: QemuImg) -> None:
    img.create("a.qcow2", "1M")
    qio.io("a.qcow2", "write -P 0x11 0 64k", log=True)
    assert qio.transcript is not None
    assert qio.transcript.text() == (
        "$ qemu-io -f qcow2 -c write -P 0x11 0 64k a.qcow2\n"
        "wrote 65536/65536 bytes at offset 0\n"
        "64 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)\n"
    )


def test_tool_that_cannot_run(tmp_path: Path) -> None:
    tool = QemuImg(str(tmp_path / "no-such-qemu-img"), tmp_path)
    with pytest.raises(ToolError, match="cannot run it") as ei:
        tool.run("info", "x")
    assert ei.value.status is None and "no-such-qemu-img" in str(ei.value)


def test_qemu_nbd_starts_and_stops(img: QemuImg, tmp_path: Path, sockdir: Path) -> None:
    img.create("a.qcow2", "1M")
    # -t: persistent, so the server outlives its first client and stop() has work to do
    server = QemuNBD(which("qemu-nbd"), tmp_path, sockdir / "nbd0.sock", tmp_path / "a.qcow2",
                     ("-f", "qcow2", "-t"))
    assert server.uri == f"nbd+unix:///?socket={sockdir / 'nbd0.sock'}"
    with server:
        assert server.socket.exists()  # ready means listening
        assert server._proc is not None
        pid = server._proc.pid
        assert process_alive(pid) and pid in {p for p, _ in REGISTRY.alive()}
        # a client can read the export while it runs
        info = QemuImg(img.path, tmp_path).info(server.uri)
        assert info["virtual-size"] == 1 << 20
        assert process_alive(pid)
        start = time.monotonic()
    assert time.monotonic() - start < 2  # stopped promptly, not after a kill timeout
    assert not process_alive(pid)
    assert pid not in {p for p, _ in REGISTRY.alive()}
    # asked to stop (SIGTERM), qemu-nbd cleans up its socket itself
    assert not server.socket.exists()
    server.stop()  # twice is fine


def test_qemu_nbd_bad_image_fails_quickly(tmp_path: Path, sockdir: Path) -> None:
    server = QemuNBD(which("qemu-nbd"), tmp_path, sockdir / "nbd0.sock",
                     tmp_path / "missing.qcow2")
    start = time.monotonic()
    with pytest.raises(ToolError) as ei:
        server.start()
    assert time.monotonic() - start < 2
    msg = str(ei.value)
    assert msg.startswith("qemu-nbd failed (exit status 1)")
    assert "missing.qcow2" in msg and "No such file or directory" in msg
    assert f"command: {server.path} -k {sockdir / 'nbd0.sock'}" in msg
    assert server._proc is None


@pytest.mark.parametrize("case", ["cannot-run", "timeout"])
def test_tool_error_for_a_program_that_did_not_finish(case: str, tmp_path: Path) -> None:
    if case == "cannot-run":
        tool = QemuImg(str(tmp_path / "no-such-qemu-img"), tmp_path)
        with pytest.raises(ToolError) as ei:
            tool.run("info", "x")
    else:
        tool = QemuImg(str(fake_program(tmp_path / "qemu-img", "exec sleep 10")), tmp_path)
        start = time.monotonic()
        with pytest.raises(ToolError, match="timed out") as ei:
            tool.run("info", "x", timeout=0.5)
        assert time.monotonic() - start < 5
    assert "still running" not in str(ei.value)
