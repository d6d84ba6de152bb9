"""``harness.coverage`` and ``qiotests coverage`` without a gcov build.

gcovr's JSON is written here by hand in the shape gcovr 8.8 writes (checked against a
real report of QEMU 7.2's gcov build); what is tested is how the harness counts lines
and branches from it, which iotests it takes as upstream's bitmap tests, and the table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import coverage as qcov
from tests.conftest import REPO


def _line(no: int, count: int, func: str, branches: tuple[int, ...] = ()) -> dict[str, object]:
    return {"line_number": no, "function_name": func, "count": count,
            "branches": [{"count": c} for c in branches]}


def _report() -> dict[str, object]:
    hb = {"file": "util/hbitmap.c",
          "lines": [_line(10, 3, "hbitmap_set", (3, 0)), _line(11, 0, "hbitmap_set"),
                    _line(12, 0, "hbitmap_set"), _line(20, 0, "hbitmap_free"),
                    # one line per function instance: covered once means covered
                    _line(30, 0, "inl"), _line(30, 2, "inl"),
                    {**_line(40, 0, "x"), "gcovr/noncode": True}],
          "functions": [{"name": "hbitmap_set", "execution_count": 3},
                        {"name": "hbitmap_free", "execution_count": 0},
                        {"name": "inl", "execution_count": 2}]}
    other = {"file": "block/qcow2.c", "lines": [_line(1, 1, "f")], "functions": []}
    backup = {"file": "block/backup.c", "lines": [_line(5, 1, "b", (1, 1))], "functions": []}
    return {"gcovr/format_version": "0.14", "files": [hb, other, backup]}


def test_lines_branches_and_uncovered_runs_are_counted_per_line() -> None:
    files = qcov.parse_gcovr_json(_report())
    assert [f.path for f in files] == ["util/hbitmap.c", "block/backup.c"]  # FILES order only
    hb = files[0]
    assert hb.lines == (2, 5)                 # 10 and 30 of 10, 11, 12, 20, 30 (40 no code)
    assert hb.branches == (1, 2)
    assert hb.functions == (2, 3)
    assert hb.uncovered_functions == ["hbitmap_free"]
    assert hb.uncovered_lines == [("hbitmap_set", 11, 12), ("hbitmap_free", 20, 20)]
    text = qcov.uncovered_text(files)
    assert "Functions never entered: `hbitmap_free`" in text
    assert "- `hbitmap_set`: 11-12" in text


def test_table_puts_suites_side_by_side_with_a_total() -> None:
    ours = qcov.parse_gcovr_json(_report())
    theirs = [f for f in qcov.parse_gcovr_json(_report()) if f.path == "block/backup.c"]
    ours[0].branches_no_assert = (1, 1)       # hbitmap.c: one branch was on an assert line
    ours[1].branches_no_assert = (2, 2)
    text = qcov.table([("qiotests", ours), ("upstream", theirs)])
    rows = {r.split(" | ")[0].strip("| `*"): r for r in text.splitlines()}
    assert rows["file"].startswith("| file | qiotests: lines | qiotests: branches | "
                                   "qiotests: branches w/o assert/trace | upstream: lines")
    assert "40.0 % (2/5) | 50.0 % (1/2) | 100.0 % (1/1) | - | - | -" in rows["util/hbitmap.c"]
    # the upstream column has no filtered report: its total says "-", never a made-up sum
    assert rows["total"].endswith("50.0 % (3/6) | 75.0 % (3/4) | 100.0 % (3/3) | "
                                  "100.0 % (1/1) | 100.0 % (2/2) | - |")
    assert set(qcov.FILES) <= set(rows)       # a file no suite ran is a row of dashes


def test_upstream_bitmap_tests_by_name_group_or_use(tmp_path: Path) -> None:
    io = tmp_path / "tests" / "qemu-iotests"
    (io / "tests").mkdir(parents=True)
    (io / "165").write_text("vm.qmp('block-dirty-bitmap-add')\n")
    (io / "166").write_text("# group: rw quick\nvm.qmp('block-commit')\n")
    (io / "167").write_text("# group: rw bitmaps\n")
    (io / "165.out").write_text("block-dirty-bitmap-add\n")
    (io / "tests" / "migrate-bitmaps-test").write_text("")
    (io / "tests" / "copy-before-write").write_text("sync='bitmap', bitmap-mode='always'\n")
    (io / "tests" / "mirror-top-perms").write_text("")
    assert qcov.upstream_bitmap_tests(tmp_path) == ["165", "167", "copy-before-write",
                                                   "migrate-bitmaps-test"]


def test_reset_counters_removes_only_gcda(tmp_path: Path) -> None:
    (tmp_path / "a.p").mkdir()
    for name in ("a.p/x.gcda", "a.p/x.gcno", "y.gcda"):
        (tmp_path / name).write_text("")
    assert qcov.reset_counters(tmp_path) == 2
    assert [p.name for p in tmp_path.rglob("*.gc*")] == ["x.gcno"]


def test_outcome_lines_of_both_suites() -> None:
    summary = qcov.iotests_outcome("165  pass\nNot run: vvfat\nFailures: 194\n"
                                   "Failed 1 of 3 iotests\n")
    assert summary == "Not run: vvfat; Failures: 194; Failed 1 of 3 iotests"
    assert qcov.pytest_outcome("x\n===== 58 passed, 1 xfailed in 33.56s =====\n") == \
        "58 passed, 1 xfailed in 33.56s"
    assert qcov.pytest_outcome("killed\n") == "no summary line (see pytest.txt)"


def test_gcovr_reads_only_the_bitmap_files_then_reports_from_its_json(tmp_path: Path) -> None:
    read, lines, branches, no_assert = qcov.gcovr_argvs("gcovr", Path("/s"), Path("/b"), tmp_path)
    filters = [read[i + 1] for i, a in enumerate(read) if a == "--filter"]
    assert filters == [re.escape(f"/s/{f}") + "$" for f in qcov.FILES]
    assert read[-3:] == ["--json", str(tmp_path / "coverage.json"), "/b"]
    assert "--add-tracefile" in lines and "--html-details" in lines
    assert branches[-2:] == ["--txt-metric", "branch"]
    # the filtered figure reads the counters again (gcovr ignores exclusions on tracefiles)
    assert no_assert[:len(read) - 3] == read[:-3] and no_assert[-1] == "/b"
    assert qcov.ASSERT_TRACE_LINES in no_assert
    assert str(tmp_path / "coverage-no-assert.json") in no_assert


def test_assert_trace_pattern_matches_calls_only() -> None:
    pattern = re.compile(qcov.ASSERT_TRACE_LINES)
    for line in ("    assert(s->bcs);", "assert (a &&", "\tg_assert_cmpint(x, ==, 1);",
                 "    trace_backup_do_cow_enter(job, start, offset, bytes);"):
        assert pattern.match(line), line
    for line in ("    if (assert_ok(x)) {", "    ret = trace_count;", "    x = 1; assert(y);",
                 "    bdrv_assert_drained(bs);"):
        assert not pattern.match(line), line


C_PROGRAM = """#include <assert.h>
#include <stdlib.h>

static int half(int n)
{
    assert(n % 2 == 0);
    if (n > 2) {
        return n / 2;
    }
    return 1;
}

int main(int argc, char **argv)
{
    return half(argc > 1 ? atoi(argv[1]) : 4) == 2 ? 0 : 1;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build a gcov program")
def test_real_gcovr_reports_both_branch_figures(tmp_path: Path) -> None:
    """A real gcov build of a tiny C file named like a QEMU file, run once, then the
    harness's own gcovr runs: the raw figure counts the assert's two branches (one never
    taken), the second figure leaves exactly those out."""
    src, build, out = tmp_path / "src", tmp_path / "build", tmp_path / "out"
    (src / "util").mkdir(parents=True)
    build.mkdir()
    (src / "util" / "hbitmap.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "--coverage", "-O0", "-o", str(build / "prog"),
                    str(src / "util" / "hbitmap.c")], cwd=build, check=True)
    subprocess.run([str(build / "prog")], cwd=build, check=True)
    (hb,) = qcov.run_gcovr(src, build, out)
    assert hb.path == "util/hbitmap.c"
    assert hb.branches == (3, 6)              # assert: 1 of 2, if: 1 of 2, ?: 1 of 2
    assert hb.branches_no_assert == (2, 4)    # the assert line's two are left out
    assert hb.lines == (hb.lines[1] - 1, hb.lines[1])  # only "return 1;" is not run
    assert (out / "branches-no-assert.txt").is_file()
    table = qcov.table([("qiotests", [hb])])
    assert "| 50.0 % (3/6) | 50.0 % (2/4) |" in table


def test_cli_refuses_a_report_dir_inside_the_repo() -> None:
    r = subprocess.run([sys.executable, "-m", "harness.cli", "coverage", "--dir", "cov"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == f"coverage: {REPO.resolve() / 'cov'} must be outside the repo"
    assert "Traceback" not in r.stderr


def test_run_ours_runs_only_the_named_cases(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``qiotests coverage -- cases/test_x.py`` measures that file, not the whole suite
    (pytest would collect ``cases`` and the file); options alone keep ``cases``."""
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "test_x.py").write_text("")
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0)
    monkeypatch.setattr(subprocess, "run", fake_run)
    qcov.run_ours(Path("/b"), tmp_path, tmp_path / "out", 2, ["cases/test_x.py::test_a"])
    qcov.run_ours(Path("/b"), tmp_path, tmp_path / "out", 2, ["-k", "quick"])
    assert "cases" not in seen[0] and seen[0][-1] == "cases/test_x.py::test_a"
    assert seen[1][3] == "cases" and seen[1][-2:] == ["-k", "quick"]
