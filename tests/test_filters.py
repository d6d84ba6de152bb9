"""harness.filters (and the filtering Transcript) on output real QEMU 7.2 and 10.0 print.

Every sample below was captured from the programs themselves (Debian 7.2.22 and the
10.0.2 backport), so a filter that drifts from QEMU's real formats fails here.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from harness.filters import (
    DEFAULT_TEXT_FILTERS,
    apply,
    drop_keys,
    node_ids,
    path_filter,
    qemu_io_timings,
    qemu_version,
    strip_timestamp,
    timestamps,
)
from harness.transcript import Transcript, render_json

QEMU_IO_72 = (
    "wrote 65536/65536 bytes at offset 0\n"
    "64 KiB, 1 ops; 00.00 sec (22.917 MiB/sec and 366.6766 ops/sec)\n"
    "read 65536/65536 bytes at offset 0\n"
    "64 KiB, 1 ops; 00.00 sec (1.300 GiB/sec and 21299.2545 ops/sec)\n"
    "write failed: Input/output error\n"
    "Pattern verification failed at offset 0, 4096 bytes\n"
)
QEMU_IO_100 = (
    "wrote 65536/65536 bytes at offset 0\n"
    "64 KiB, 1 ops; 00.01 sec (11.764 MiB/sec and 188.2315 ops/sec)\n"
    "read 65536/65536 bytes at offset 0\n"
    "64 KiB, 1 ops; 00.00 sec (630.314 MiB/sec and 10085.0167 ops/sec)\n"
    "write failed: Input/output error\n"
    "Pattern verification failed at offset 0, 4096 bytes\n"
)
QEMU_IO_FILTERED = (
    "wrote 65536/65536 bytes at offset 0\n"
    "64 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)\n"
    "read 65536/65536 bytes at offset 0\n"
    "64 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)\n"
    "write failed: Input/output error\n"
    "Pattern verification failed at offset 0, 4096 bytes\n"
)


@pytest.mark.parametrize("raw", [QEMU_IO_72, QEMU_IO_100], ids=["qemu-7.2", "qemu-10.0"])
def test_qemu_io_timings_hide_rates_and_keep_the_rest(raw: str) -> None:
    assert qemu_io_timings(raw) == QEMU_IO_FILTERED
    assert qemu_io_timings(QEMU_IO_FILTERED) == QEMU_IO_FILTERED  # idempotent


def test_qemu_io_timings_keep_size_and_op_count() -> None:
    # readv of two 4k vectors: one op of 8 KiB; the size and count are the story
    raw = ("read 8192/8192 bytes at offset 0\n"
           "8 KiB, 1 ops; 00.00 sec (345.319 MiB/sec and 44200.8487 ops/sec)")
    assert qemu_io_timings(raw).splitlines() == [
        "read 8192/8192 bytes at offset 0", "8 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)"]
    raw = "1 MiB, 16 ops; 00.02 sec (43.5 MiB/sec and 696.1 ops/sec)"
    assert qemu_io_timings(raw) == "1 MiB, 16 ops; XX.XX sec (XXX/sec and XXX ops/sec)"


def test_qemu_io_timings_for_an_operation_slower_than_a_second() -> None:
    # qemu-io --image-opts driver=null-co,size=1M,latency-ns=1100000000 -c "read 0 4k"
    # (7.2.22 and 10.0.2 print the same form)
    raw = ("read 4096/4096 bytes at offset 0\n"
           "4 KiB, 1 ops; 0:00:01.10 (3.632 KiB/sec and 0.9081 ops/sec)")
    assert qemu_io_timings(raw) == (
        "read 4096/4096 bytes at offset 0\n4 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)"
    )


def test_node_ids_hide_generated_names_only() -> None:
    raw = ('{"node-name": "#block123", "file": "#block4567", "backing": "drive0"}\n'
           "Node '#block12' is busy: block device is in use by block job: commit\n"
           '{"node-name": "block0", "device": "myblock12"}')
    assert node_ids(raw) == (
        '{"node-name": "#blockNNN", "file": "#blockNNN", "backing": "drive0"}\n'
        "Node '#blockNNN' is busy: block device is in use by block job: commit\n"
        '{"node-name": "block0", "device": "myblock12"}')


EVENT: dict[str, Any] = {
    "timestamp": {"seconds": 1795655077, "microseconds": 226915},
    "event": "BLOCK_JOB_COMPLETED",
    "data": {"device": "j0", "len": 1048576, "offset": 1048576, "speed": 0, "type": "backup"},
}


def test_timestamps_in_rendered_events() -> None:
    rendered = render_json(EVENT)
    assert '"seconds": 1795655077' in rendered
    out = timestamps(rendered)
    assert "1795655077" not in out and "226915" not in out
    assert json.loads(out)["timestamp"] == {"microseconds": "USECS", "seconds": "SECS"}
    assert json.loads(out)["data"] == EVENT["data"]


def test_timestamps_in_events_as_qemu_sends_them() -> None:
    # what QEMU writes on the QMP socket (and what <vm>.qmp.log records), key order kept
    wire = json.dumps(EVENT)
    assert wire.startswith('{"timestamp": {"seconds": ')
    assert "1795655077" not in timestamps(wire)


@pytest.mark.parametrize(("raw", "expected"), [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
     "QEMU emulator version QEMU_VERSION"),
    ("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
     "qemu-img version QEMU_VERSION"),
    ("QEMU emulator version 9.2.50 (v9.2.0-1234-gdeadbeef)", "QEMU emulator version QEMU_VERSION"),
    ("qemu-io version 8.0.0", "qemu-io version QEMU_VERSION"),
    ("Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers",
     "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers"),
])
def test_qemu_version(raw: str, expected: str) -> None:
    assert qemu_version(raw) == expected


def test_path_filter_escapes_regex_metacharacters() -> None:
    scratch = "/tmp/qio+test.1/scratch"
    f = path_filter(scratch, "TEST_DIR")
    assert f(f'{{"filename": "{scratch}/a.qcow2"}}') == '{"filename": "TEST_DIR/a.qcow2"}'
    # unescaped, '+' and '.' would make these paths match too
    for other in ("/tmp/qiooootestX1/scratch/a.qcow2", "/tmp/qiotest.1/scratch/a.qcow2"):
        assert f(other) == other
    assert f.__name__ == "filter_TEST_DIR"


def test_path_filter_ignores_a_trailing_slash_and_replaces_every_occurrence() -> None:
    f = path_filter("/tmp/qio-x/", "SOCK_DIR")
    assert f("path=/tmp/qio-x/vm0.qmp,path=/tmp/qio-x/nbd.sock") == (
        "path=SOCK_DIR/vm0.qmp,path=SOCK_DIR/nbd.sock")


def test_strip_timestamp_is_pure() -> None:
    original = copy.deepcopy(EVENT)
    out = strip_timestamp(EVENT)
    assert original == EVENT
    assert out == {"event": "BLOCK_JOB_COMPLETED", "data": EVENT["data"]}
    out["data"]["len"] = 0  # the copy shares nothing with the input
    assert EVENT["data"]["len"] == 1048576


def test_drop_keys_at_any_depth_and_pure() -> None:
    reply: dict[str, Any] = {"return": [
        {"node-name": "drive0", "dirty-bitmaps": [
            {"name": "b0", "busy": False, "recording": True, "count": 65536},
            {"name": "b1", "busy": True, "recording": True, "count": 0},
        ]},
    ]}
    original = copy.deepcopy(reply)
    out = drop_keys(reply, ["busy", "count"])
    assert reply == original
    assert out == {"return": [{"node-name": "drive0", "dirty-bitmaps": [
        {"name": "b0", "recording": True}, {"name": "b1", "recording": True}]}]}
    out["return"][0]["dirty-bitmaps"].append({})
    assert len(reply["return"][0]["dirty-bitmaps"]) == 2


def test_default_filters_on_a_transcript_snippet() -> None:
    raw = (
        '{"event": "BLOCK_JOB_COMPLETED", "timestamp": {"microseconds": 5, "seconds": 7}}\n'
        "qemu-io #block311: write -P 0x11 0 64k\n" + QEMU_IO_100.splitlines()[1] + "\n"
        "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"
    )
    assert apply(DEFAULT_TEXT_FILTERS, raw) == (
        '{"event": "BLOCK_JOB_COMPLETED", '
        '"timestamp": {"microseconds": "USECS", "seconds": "SECS"}}\n'
        "qemu-io #blockNNN: write -P 0x11 0 64k\n"
        "64 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)\n"
        "QEMU emulator version QEMU_VERSION\n"
    )


def test_transcript_filters_paths_before_the_defaults() -> None:
    log = Transcript([path_filter("/tmp/pytest-of-u/test_a0", "TEST_DIR")])
    log.log("qemu-io /tmp/pytest-of-u/test_a0/a.qcow2 #block1\n" + QEMU_IO_72.splitlines()[1])
    log.event(EVENT)
    assert log.text() == (
        "qemu-io TEST_DIR/a.qcow2 #blockNNN\n"
        "64 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)\n"
        '{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j0", "len": 1048576, '
        '"offset": 1048576, "speed": 0, "type": "backup"}}\n'
    )


def test_transcript_refuses_a_line_that_looks_like_a_section_header() -> None:
    log = Transcript()
    with pytest.raises(ValueError, match="section header"):
        log.log("ok\n=== test_other ===")
