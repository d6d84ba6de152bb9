"""``harness.matrix`` without apt or QEMU: the version table, results and the summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import matrix, processes
from harness.errors import ConfigError
from harness.matrix import Outcome, Row
from tests.conftest import CHILD_REPORT, child_report


def test_the_table_names_what_apt_is_asked_for() -> None:
    by_label = {r.label: r for r in matrix.rows()}
    assert list(by_label) == ["7.2", "10.0", "10.2"]
    assert by_label["7.2"].apt_spec == "qemu/bookworm"
    assert by_label["10.0"].apt_spec == "qemu/trixie"
    assert by_label["10.2"].apt_spec == "qemu=1:10.2.2+ds-1"
    assert by_label["10.2"].deb_src == ("deb-src [signed-by=/usr/share/keyrings/debian-archive-"
                                        "keyring.gpg] http://deb.debian.org/debian sid main")


def test_a_new_row_is_one_line() -> None:
    table = (*matrix.SOURCES, ("sid=1:11.1.0+ds-1", "11.1"))
    new = matrix.rows(table)[-1]
    assert new == Row(label="11.1", suite="sid", version="1:11.1.0+ds-1")
    assert matrix.Layout(Path("/m")).src("11.1") == Path("/m/src/11.1")
    assert matrix.Layout(Path("/m")).build("11.1") == Path("/m/build/11.1")


def test_bad_rows_and_labels_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match=re.escape("label '7.2' appears twice")):
        matrix.rows((("bookworm", "7.2"), ("trixie", "7.2")))
    with pytest.raises(ConfigError, match=re.escape("want ('suite' or 'suite=version', 'label')")):
        matrix.rows((("Bookworm Main", "7.2"),))
    unknown = re.escape("no row labelled '9.9' (known: 7.2, 10.0, 10.2)")
    with pytest.raises(ConfigError, match=unknown):
        matrix.select(matrix.rows(), ["9.9"])
    assert [r.label for r in matrix.select(matrix.rows(), ["10.2", "7.2"])] == ["10.2", "7.2"]


def test_a_kept_tree_is_reused_without_apt(tmp_path: Path) -> None:
    layout = matrix.Layout(tmp_path)
    (layout.src("7.2")).mkdir(parents=True)
    (layout.src("7.2") / "configure").write_text("")
    assert matrix.fetch(matrix.rows()[0], layout, tmp_path / "fetch.log") == "reused"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="cases.test_255" name="test_a" time="1"/>
<testcase classname="cases.test_255" name="test_b" time="1"/>
<testcase classname="cases.test_bitmap_qmp" name="test_merge" time="1">
  <skipped type="pytest.xfail" message="QEMU bug seen in 7.2.22: SIGSEGV"/></testcase>
<testcase classname="cases.test_backup_pull" name="test_export" time="0">
  <skipped type="pytest.skip" message="Skipped: QEMU lacks block-export-add"/></testcase>
<testcase classname="cases.test_257" name="test_x" time="2"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def test_parse_junit_and_the_summary() -> None:
    o = matrix.parse_junit(JUNIT, "7.2")
    o.version = "7.2.22"
    assert o.passed == 2
    assert o.xfailed == [("cases/test_bitmap_qmp.py::test_merge",
                          "QEMU bug seen in 7.2.22: SIGSEGV")]
    assert o.skipped == [("cases/test_backup_pull.py::test_export", "QEMU lacks block-export-add")]
    assert o.failed == ["cases/test_257.py::test_x"]
    assert not o.ok
    broken = Outcome(label="10.2", version="10.2.2", error="build failed: /m/build/10.2/log")
    text = matrix.summary([o, broken])
    assert text.splitlines()[:4] == [
        "| version | passed | xpassed | skipped | xfailed | failed |",
        "| --- | --- | --- | --- | --- | --- |",
        "| 7.2 (7.2.22) | 2 | 0 | 1 | 1 | 1 |",
        "| 10.2 (10.2.2) | - | - | - | - | build failed: /m/build/10.2/log |",
    ]
    assert "- 7.2 skipped `cases/test_backup_pull.py::test_export`: QEMU lacks block-export-add" \
        in text
    assert "- 7.2 FAILED `cases/test_257.py::test_x`" in text


def test_xpassed_count_from_the_last_summary_line() -> None:
    out = "....X.\n= 1 failed, 40 passed, 2 skipped, 1 xfailed, 1 xpassed in 50.0s =\n"
    assert matrix.xpassed_count(out) == 1
    assert matrix.xpassed_count("== 3 passed in 1.0s ==\n") == 0
    assert matrix.xpassed_count("") == 0


def test_apt_and_dpkg_steps_run_in_their_own_group_with_the_file_size_limit(
        tmp_path: Path) -> None:
    """Issue 9 (items 2 and 9): the fetch steps ran through plain subprocess."""
    log = tmp_path / "fetch.log"
    with log.open("ab") as f:
        matrix._run(CHILD_REPORT, tmp_path, f)
    assert child_report(log) == (processes.max_file_size(), True)
