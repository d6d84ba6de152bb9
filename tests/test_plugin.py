"""The pytest wiring end to end: golden sections, --regen, -n 2, as a user runs them.

Each test builds a throwaway project (tests/conftest.py: Project) holding copies of the
real ``pyproject.toml`` and (now logic-free) ``conftest.py`` files, a tiny case module and
its ``expected/`` file, and runs pytest on it in a subprocess against the QEMU on PATH.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness.binaries import KvmStatus, Probe
from harness.plugin import unmet_requirements
from tests.conftest import REPO, Project

DEMO = '''
from harness.session import Case


def test_alpha(qio: Case) -> None:
    qio.log.log("alpha one")
    qio.log.log(f"image {qio.path('a.qcow2')}")


def test_beta(qio: Case) -> None:
    qio.log.log("beta one")
    qio.log.log("beta two")


def test_silent(qio: Case) -> None:
    pass
'''

GOOD = """\
=== test_alpha ===
alpha one
image TEST_DIR/a.qcow2

=== test_beta ===
beta one
beta two

"""


def regen_report(result: pytest.RunResult, golden: str = "expected/demo.out") -> list[str]:
    """The section names the run says it rewrote in ``golden`` (one report line expected)."""
    lines = [ln for ln in result.outlines if re.search(rf"{re.escape(golden)}: ", ln)]
    assert len(lines) == 1, result.outlines
    return lines[0].rsplit(": ", 1)[1].split(", ")


def test_matching_sections_pass(project: Project) -> None:
    project.case("demo", DEMO)
    project.golden("demo", GOOD)
    result = project.run()
    result.assert_outcomes(passed=3)
    assert result.ret == 0
    # the header says which QEMU and accelerator the run used
    result.stdout.fnmatch_lines(["qemu: *", "accel: *"])


def test_one_changed_line_fails_only_that_test_with_a_diff(project: Project) -> None:
    project.case("demo", DEMO)
    project.golden("demo", GOOD.replace("beta two", "beta TWO"))
    result = project.run()
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "FAILED cases/test_demo.py::test_beta" in out
    assert "FAILED cases/test_demo.py::test_alpha" not in out
    result.stdout.fnmatch_lines([
        "*--- expected/demo.out (=== test_beta ===)",
        "*+++ */demo.out.actual",
        "*@@ -1,2 +1,2 @@",
        "* beta one",
        "*-beta TWO",
        "*+beta two",
        "*actual output saved in */demo.out.actual; if the new output is right, rerun with --regen",
    ])
    m = re.search(r"actual output saved in (\S+);", out)
    assert m is not None
    saved = m.group(1)
    with open(saved) as f:
        assert f.read() == "beta one\nbeta two\n"
    # the report reads like a bug report, not a wall of harness traceback
    assert "harness/golden.py" not in out


def test_missing_section_and_missing_file_are_clear_errors(project: Project) -> None:
    project.case("demo", DEMO)
    project.golden("demo", GOOD.split("=== test_beta ===")[0])
    project.case("nofile", '''
        from harness.session import Case

        def test_lonely(qio: Case) -> None:
            qio.log.log("hello")
    ''')
    result = project.run()
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    golden = project.golden_path("demo")
    assert re.search(rf"{re.escape(str(golden))} has no section '=== test_beta ==='; "
                     r"run the test with --regen", out), out
    nofile = project.golden_path("nofile")
    assert f"{nofile} (the file does not exist) has no section '=== test_lonely ==='" in out
    # a test that logs nothing needs no section
    assert "FAILED cases/test_demo.py::test_silent" not in out


def test_regen_rewrites_only_the_tests_that_ran(project: Project) -> None:
    project.case("demo", DEMO)
    stale = """\
        === test_beta ===
        old beta

        === test_unowned ===
        kept as it is

        === test_alpha ===
        old alpha

    """
    golden = project.golden("demo", stale)
    before = golden.read_text()

    result = project.run("--regen", "-k", "test_beta")
    result.assert_outcomes(passed=1, deselected=2)
    assert regen_report(result) == ["test_beta"]
    assert golden.read_text() == before.replace("old beta\n", "beta one\nbeta two\n")

    result = project.run("--regen")
    result.assert_outcomes(passed=3)
    assert regen_report(result) == ["test_alpha"]
    assert golden.read_text() == (
        "=== test_beta ===\nbeta one\nbeta two\n\n"
        "=== test_unowned ===\nkept as it is\n\n"
        "=== test_alpha ===\nalpha one\nimage TEST_DIR/a.qcow2\n\n"
    )
    project.run().assert_outcomes(passed=3)


def test_regen_does_not_write_a_failing_test(project: Project) -> None:
    project.case("demo", DEMO + '''

def test_broken(qio: Case) -> None:
    qio.log.log("half a story")
    assert False, "the case itself failed"
''')
    golden = project.golden("demo", GOOD + "=== test_broken ===\nold story\n\n")
    before = golden.read_text()
    result = project.run("--regen")
    result.assert_outcomes(passed=3, failed=1)
    assert golden.read_text() == before


def test_regen_with_two_workers(project: Project) -> None:
    source = DEMO + "".join(f'''

def test_w{i}(qio: Case) -> None:
    qio.log.log("worker story {i}")
''' for i in range(4))
    project.case("demo", source)
    golden = project.golden("demo", "".join(
        f"=== test_w{i} ===\nstale {i}\n\n" for i in (3, 1, 0, 2)) + GOOD)
    result = project.run("-n", "2", "--regen")
    result.assert_outcomes(passed=7)
    # the controller alone writes, once, whatever order the workers finished in
    assert sorted(regen_report(result)) == ["test_w0", "test_w1", "test_w2", "test_w3"]
    assert golden.read_text() == "".join(
        f"=== test_w{i} ===\nworker story {i}\n\n" for i in (3, 1, 0, 2)) + GOOD
    assert sorted(p.name for p in golden.parent.iterdir()) == ["demo.out"]
    project.run("-n", "2").assert_outcomes(passed=7)


def test_regen_of_a_test_that_now_logs_nothing(project: Project) -> None:
    project.case("demo", DEMO)
    project.golden("demo", GOOD + "=== test_silent ===\nit used to say this\n\n")
    project.run("--regen").assert_outcomes(passed=3)
    project.run().assert_outcomes(passed=3)


def test_unused_sections_are_reported(project: Project) -> None:
    project.case("demo", DEMO)
    project.golden("demo", GOOD + "=== test_removed_long_ago ===\nstale\n\n")
    result = project.run()
    result.assert_outcomes(passed=3)
    assert "test_removed_long_ago" in result.stdout.str()


SCRATCH = """
from pathlib import Path

from harness.session import Case

RECORD = Path(__file__).resolve().parent.parent / "scratch.txt"


def test_passes(qio: Case) -> None:
    (qio.scratch / "evidence").write_text("x")
    with RECORD.open("a") as f:
        f.write(f"passes {qio.scratch}\\n")


def test_fails(qio: Case) -> None:
    (qio.scratch / "evidence").write_text("x")
    with RECORD.open("a") as f:
        f.write(f"fails {qio.scratch}\\n")
    assert False
"""


@pytest.mark.parametrize("keep", [False, True], ids=["default", "retention-all"])
def test_scratch_dirs_stay_for_failures_or_with_retention_all(project: Project,
                                                              keep: bool) -> None:
    project.case("scratch", SCRATCH)
    result = project.run(*(["-o", "tmp_path_retention_policy=all"] if keep else []))
    result.assert_outcomes(passed=1, failed=1)
    scratch = dict(ln.split() for ln in (project.root / "scratch.txt").read_text().splitlines())
    assert (Path(scratch["fails"]) / "evidence").exists()
    assert (Path(scratch["passes"]) / "evidence").exists() == keep


REPORT = """
from harness.session import Case


def test_bad_command(qio: Case) -> None:
    vm = qio.vm(machine_type="none")
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="nosuch", name="b0")
"""


def test_a_harness_error_reports_the_case_line_not_harness_frames(project: Project) -> None:
    path = project.case("report", REPORT)
    lineno = path.read_text().splitlines().index(
        '    vm.qmp("block-dirty-bitmap-add", node="nosuch", name="b0")') + 1
    result = project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f'test_report.py:{lineno}: vm.qmp("block-dirty-bitmap-add", node="nosuch", name="b0")',
        "CommandError: vm 'vm0': block-dirty-bitmap-add failed: GenericError: Cannot find device*",
        "  sent: {'execute': 'block-dirty-bitmap-add', *",
        "  received: {'error': {'class': 'GenericError', *",
    ])
    assert "harness/machine.py" not in result.stdout.str()


ONE_FILE_CASE = '''
import pytest

from harness.actions import writes
from harness.block import blockdev, qcow2_node


@pytest.mark.requires(qmp=["block-dirty-bitmap-add"])
def test_one(qio):
    qio.img.create("disk.qcow2", 4 << 20)
    vm = qio.vm(args=blockdev(qcow2_node(qio.path("disk.qcow2"), "drive0")),
                machine_type="none")
    vm.launch()
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="b", persistent=True)
    writes(vm, "drive0", [(0x10000, 0x1000)])
'''


def test_the_plugin_works_from_a_fresh_venv_outside_this_repo(tmp_path: Path) -> None:
    """``pip install`` of this project into a new venv gives a directory with nothing but
    one test file the ``qio`` fixture, the options, the requires marker, golden files and
    the oracle: the pytest11 entry point, not this repository's conftest, wires it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                          "--disable-pip-version-check", str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    project = tmp_path / "downstream"
    project.mkdir()
    (project / "test_one.py").write_text(ONE_FILE_CASE)
    pytest_bin = str(venv / "bin" / "pytest")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([pytest_bin, "-p", "no:cacheprovider", *args, "test_one.py"],
                              cwd=project, capture_output=True, text=True, timeout=300)

    regen = run("--regen")
    assert regen.returncode == 0, regen.stdout + regen.stderr
    golden = (project / "expected" / "one.out").read_text()
    assert golden.startswith("=== test_one ===\n")
    assert "oracle (before shutdown of vm0): drive0/b: complete, dirty [0x10000+0x10000]" \
        in golden
    assert golden.rstrip().endswith("oracle verdict: 2 bitmap check(s), all passed")
    again = run()
    assert again.returncode == 0 and "1 passed" in again.stdout, again.stdout
    assert "plugins:" in again.stdout and "qiotests" in again.stdout


MALFORMED = {
    "stray": (b"stray text\n" + GOOD.encode(), "demo.out:1: text before the first "
              "'=== test... ===' header"),
    "duplicate": (GOOD.encode() + b"=== test_beta ===\nagain\n\n",
                  "demo.out:9: section '=== test_beta ===' appears twice"),
    "not-utf8": (GOOD.encode().replace(b"beta two", b"beta \xff"),
                 "demo.out:7: byte 0xff (column 6) is not UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_golden_file_is_named_once_and_the_summary_stays(
        project: Project, kind: str) -> None:
    """Issue 9 item 4: the tests said so, then a traceback ended the run and pytest's
    "N failed" line was lost."""
    data, message = MALFORMED[kind]
    project.case("demo", DEMO)
    project.case("other", OTHER)
    project.golden("other", "=== test_other ===\nother\n\n")
    golden = project.golden_path("demo")
    golden.write_bytes(data)
    result = project.run("-n", "2")
    out = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=3)  # each test of demo says why
    # before the short summary, which CI=true does not truncate and so repeats them
    reports = out.split("short test summary info")[0]
    assert reports.count(f"GoldenError: {golden.parent}/{message}") == 3, out
    summary = out.split("golden files that cannot be used", 1)[1]
    assert summary.split("short test summary info")[0].count(message) == 1, out
    assert re.search(r"=+ 3 failed, 1 passed in ", out), out


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_regen_writes_every_other_file_and_mends_a_malformed_one(
        project: Project, kind: str) -> None:
    """Issue 9 item 4: one malformed golden file stopped the --regen writer, so no file
    was written at all. Every other file is written; the malformed one is rewritten when
    the sections that ran replace all of its own, else left alone and named."""
    data, message = MALFORMED[kind]
    project.case("demo", DEMO)
    project.case("other", OTHER)
    golden = project.golden_path("demo")
    golden.write_bytes(data)
    result = project.run("--regen", "-k", "test_beta or test_other")
    out = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # a golden file could not be written
    assert project.golden_path("other").read_text() == "=== test_other ===\nother\n\n"
    assert golden.read_bytes() == data
    assert f"{message}; not rewritten: 1 of its sections did not run (test_alpha)" in out

    result = project.run("--regen")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == 0, out
    assert f"{message}; rewritten from the sections that ran" in out
    assert golden.read_text() == GOOD
    project.run().assert_outcomes(passed=4)


OTHER = '''
from harness.session import Case


def test_other(qio: Case) -> None:
    qio.log.log("other")
'''


def test_requires_args_names_the_missing_argument() -> None:
    """``requires(args=["command.argument"])`` reads the arguments from the QMP schema."""
    schema: tuple[dict[str, Any], ...] = (
        {"name": "migrate-set-parameters", "meta-type": "command", "arg-type": "1"},
        {"name": "1", "meta-type": "object", "members": [
            {"name": "downtime-limit", "type": "int"},
            {"name": "map", "type": "[2]"}]},
        {"name": "[2]", "meta-type": "array", "element-type": "2"},
        {"name": "2", "meta-type": "object", "members": [{"name": "alias", "type": "str"}]})
    probe = Probe("9.9.9", "", ("tcg",), KvmStatus(False, ""),
                  frozenset({"migrate-set-parameters"}), schema)
    env: Any = SimpleNamespace(probe=probe, missing_commands=lambda names: [])
    assert unmet_requirements(env, args=["migrate-set-parameters.downtime-limit",
                                         "migrate-set-parameters.map.alias"]) is None
    assert unmet_requirements(env, args=["migrate-set-parameters.map.transform"]) == (
        "QEMU 9.9.9: migrate-set-parameters has no argument 'map.transform'")
    assert unmet_requirements(env, args=["migrate-set-parameters.block-bitmap-mapping"]) == (
        "QEMU 9.9.9: migrate-set-parameters has no argument 'block-bitmap-mapping'")


SAYS = '''
import os
import time
from pathlib import Path

from harness.session import Case

HERE = Path(__file__).resolve().parent.parent


def test_{i}a(qio: Case) -> None:
    qio.say("first line")
    # a test of another worker ends meanwhile: the controller prints its dot (a guest
    # build says a line every few seconds)
    deadline = time.monotonic() + (10 if os.environ.get("PYTEST_XDIST_WORKER") else 0)
    while not (HERE / "b{j}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    qio.say("second line")


def test_{i}b(qio: Case) -> None:
    (HERE / "b{i}").write_text("")
'''


@pytest.mark.parametrize("mode", [["-p", "no:xdist"], ["-n", "2"]], ids=["single", "xdist"])
def test_progress_lines_start_on_a_line_of_their_own(project: Project, mode: list[str]) -> None:
    """What a case says while it runs (the guest build's progress) never shares a line
    with pytest's progress dots, in one process or from an xdist worker."""
    for i in range(4):
        project.case(f"says{i}", SAYS.format(i=i, j=i ^ 1))
    # one stream, as on a terminal: the dots go to stdout, a worker's lines to stderr
    cp = subprocess.run([sys.executable, "-m", "pytest", "cases", "-q", *mode,
                         f"--basetemp={project.root / 'basetemp'}"], cwd=project.root,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=240, check=False)
    assert cp.returncode == 0, cp.stdout
    said = [ln for ln in cp.stdout.splitlines() if "qiotests: " in ln]
    assert len(said) == 8 and all(ln.startswith("qiotests: ") for ln in said), cp.stdout
