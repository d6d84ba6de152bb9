"""CI reports: --junitxml under -n, --artifacts, GitHub annotations and step summary, the
oracle's SVG strip.

The renderer and the small pure helpers are tested on made-up data; the plugin end to end
with a throwaway project (tests/conftest.py: Project) whose cases fail for real against
the QEMU on PATH: one by a golden mismatch, one by the oracle (the model is told of a
write QEMU never saw), one passes. What is left behind must be everything a CI job
uploads, and nothing for the passing test.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import artifacts, ghactions, svg
from harness.errors import OracleFailure
from harness.model import Model, Verdict
from tests.conftest import Project

SVG_NS = "{http://www.w3.org/2000/svg}"
MiB = 1 << 20


def verdict(size: int = 64 * MiB, qemu_has: tuple[tuple[int, int], ...] = ((0x10000, 0x10000),),
            node: str = "drive0") -> Verdict:
    """A model that saw two writes, compared with a QEMU that has only ``qemu_has``."""
    m = Model()
    m.node(node, size)
    m.add_bitmap(node, "b<0>")
    m.write(node, 0x10000, 0x1000)
    m.write(node, 0x7F0000, 0x20000)
    return m.verdict(node, "b<0>", list(qemu_has))


def rects(doc: ET.Element, kind: str) -> list[ET.Element]:
    return [r for r in doc.iter(f"{SVG_NS}rect") if r.get("class") == kind]


def test_svg_draws_the_missing_range_in_red_at_its_offset() -> None:
    v = verdict()
    assert list(v.missing) == [(0x7F0000, 0x20000)] and v.size == 64 * MiB
    text = svg.render([v], title="cases/test_x.py::test_y <live>")
    doc = ET.fromstring(text)  # well-formed XML, the '<' in the title escaped
    assert doc.tag == f"{SVG_NS}svg"
    (miss,) = rects(doc, "missing")
    assert miss.get("fill") == svg.COLORS["missing"] == "#d62728"
    assert float(miss.get("x", "")) == pytest.approx(svg.LEFT + 0x7F0000 * svg.WIDTH / (64 * MiB),
                                                     abs=0.01)
    assert (miss.get("data-offset"), miss.get("data-length")) == ("0x7f0000", "0x20000")
    # the width is to scale (at least MIN_W, so a small range still shows)
    assert float(miss.get("width", "")) == pytest.approx(
        max(0x20000 * svg.WIDTH / (64 * MiB), svg.MIN_W), abs=0.01)
    assert [r.get("data-offset") for r in rects(doc, "required")] == ["0x10000", "0x7f0000"]
    assert [r.get("data-offset") for r in rects(doc, "actual")] == ["0x10000"]
    labels = [t.text for t in doc.iter(f"{SVG_NS}text")]
    assert "0x7f0000+0x20000" in labels and "0x4000000" in labels
    assert any(lbl and "INCOMPLETE" in lbl and "drive0/b<0>" in lbl for lbl in labels)


def test_svg_scales_to_the_last_range_without_a_size_and_draws_extra() -> None:
    v = dataclasses.replace(verdict(qemu_has=((0x10000, 0x10000), (0x900000, 0x10000))),
                            size=0)
    assert svg.scale_of(v) == 0x910000
    doc = ET.fromstring(svg.render([v]))
    (extra,) = rects(doc, "extra")
    assert extra.get("fill") == svg.COLORS["extra"]
    (miss,) = rects(doc, "missing")
    assert float(miss.get("x", "")) == pytest.approx(svg.x_of(0x7F0000, 0x910000), abs=0.01)


def test_svg_puts_failing_verdicts_first_and_draws_no_red_for_good_ones() -> None:
    good = verdict(qemu_has=((0x10000, 0x10000), (0x7F0000, 0x20000)), node="base")
    assert good.ok
    doc = ET.fromstring(svg.render([good, verdict()]))
    titles = [t.text or "" for t in doc.iter(f"{SVG_NS}text") if t.get("font-weight")]
    assert titles[0].startswith("drive0/") and titles[1].startswith("base/")
    assert len(rects(doc, "missing")) == 1


def test_oracle_failure_keeps_its_verdicts_and_stays_compatible() -> None:
    v = verdict()
    e = OracleFailure("text", [v])
    assert e.verdicts == [v] and str(e) == "text" and isinstance(e, AssertionError)
    assert OracleFailure("only text").verdicts == []


def test_artifact_dir_names_are_safe_and_distinct() -> None:
    assert artifacts.dir_name("cases/test_255.py::test_x[a/b-1]") == \
        "cases-test_255.py--test_x-a-b-1"
    long_a, long_b = "cases/t.py::" + "a" * 300, "cases/t.py::" + "a" * 299 + "b"
    assert artifacts.dir_name(long_a) != artifacts.dir_name(long_b)
    assert len(artifacts.dir_name(long_a)) < 140


def test_collect_copies_only_the_readable_files(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name in ("demo.out.actual", "demo.out.diff", "vm0.log", "vm0.qmp.log", "tools.log",
                 "oracle.svg", "disk.qcow2", "other.txt"):
        (scratch / name).write_text(name)
    (scratch / "sub").mkdir()
    (scratch / "sub" / "x.log").write_text("nested")
    root = tmp_path / "art"
    stale = root / "cases-t.py--test_a" / "stale.log"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    dest = artifacts.collect(root, "cases/t.py::test_a", scratch, [("call", "boom")])
    assert sorted(p.name for p in dest.iterdir()) == [
        "demo.out.actual", "demo.out.diff", "failure.txt", "oracle.svg", "tools.log",
        "vm0.log", "vm0.qmp.log"]
    text = (dest / "failure.txt").read_text()
    assert "test: cases/t.py::test_a" in text and "--- call ---\nboom" in text


def test_workflow_commands_are_escaped() -> None:
    cmd = ghactions.error_command("cases/a,b.py", 7, "t::x failed", "50% done\nnext: line")
    assert cmd == ("::error file=cases/a%2Cb.py,line=7,title=t%3A%3Ax failed::"
                   "50%25 done%0Anext: line")


CASES = '''
from harness.block import blockdev, qcow2_node
from harness.session import Case


def start(qio: Case):
    qio.img.create("disk.qcow2", 8 << 20)
    vm = qio.vm(args=blockdev(qcow2_node(qio.path("disk.qcow2"), "drive0")),
                machine_type="none")
    vm.launch()
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="b", persistent=True)
    return vm


def test_golden(qio: Case) -> None:
    start(qio)
    qio.log.log("the new line")


def test_oracle(qio: Case) -> None:
    vm = start(qio)
    vm.qemu_io("drive0", "write 0x10000 0x1000")
    qio.oracle.model(vm).write("drive0", 0x300000, 0x20000)  # a write QEMU never saw
    qio.check_live(vm, "drive0")


def test_passes(qio: Case) -> None:
    qio.log.log("fine")
'''


@pytest.fixture
def ci_run(project: Project, monkeypatch: pytest.MonkeyPatch) -> tuple[Project, pytest.RunResult]:
    """The throwaway suite run as the check job runs it: -n 2, JUnit, artifacts, and the
    variables GitHub sets."""
    project.case("demo", CASES)
    golden = project.golden("demo", "=== test_passes ===\nfine\n\n=== test_golden ===\n")
    # the golden section: what start() logs, then an old line where the new one is
    golden.write_text(golden.read_text() + "PLACEHOLDER\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(project.root / "summary.md"))
    monkeypatch.setenv("GITHUB_WORKSPACE", str(project.root))
    result = project.run("-n", "2", "--junitxml=out/junit.xml", "--artifacts=out/artifacts",
                         "--basetemp", str(project.root / "tmp"))
    return project, result


def test_junit_under_xdist_is_one_file_with_the_failure(ci_run: tuple[Project, pytest.RunResult]
                                                        ) -> None:
    project, result = ci_run
    result.assert_outcomes(passed=1, failed=2)
    out = project.root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["artifacts", "junit.xml"]
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")
    failures = {tc.get("name"): tc.find("failure") for tc in suite.iter("testcase")}
    assert failures["test_passes"] is None
    oracle = failures["test_oracle"]
    assert oracle is not None
    assert "missing [0x300000+0x20000]" in (oracle.get("message") or "")
    golden = failures["test_golden"]
    assert golden is not None and "+the new line" in (golden.text or "")


def test_artifacts_hold_what_ci_uploads_for_failures_only(
        ci_run: tuple[Project, pytest.RunResult]) -> None:
    project, _ = ci_run
    root = project.root / "out" / "artifacts"
    assert sorted(p.name for p in root.iterdir()) == [
        "cases-test_demo.py--test_golden", "cases-test_demo.py--test_oracle"]
    golden = root / "cases-test_demo.py--test_golden"
    assert sorted(p.name for p in golden.iterdir()) == [
        "demo.out.actual", "demo.out.diff", "failure.txt", "tools.log", "vm0.log",
        "vm0.qmp.log"]
    assert "+the new line" in (golden / "demo.out.diff").read_text()
    assert "-PLACEHOLDER" in (golden / "demo.out.diff").read_text()
    assert "block-dirty-bitmap-add" in (golden / "vm0.qmp.log").read_text()
    assert "create" in (golden / "tools.log").read_text()
    assert "GoldenMismatch" in (golden / "failure.txt").read_text()
    oracle = root / "cases-test_demo.py--test_oracle"
    assert sorted(p.name for p in oracle.iterdir()) == [
        "failure.txt", "oracle.svg", "tools.log", "vm0.log", "vm0.qmp.log"]
    text = (oracle / "failure.txt").read_text()
    assert "OracleFailure" in text and "missing [0x300000+0x20000]" in text
    doc = ET.parse(oracle / "oracle.svg").getroot()
    (miss,) = rects(doc, "missing")
    assert miss.get("data-offset") == "0x300000"
    assert float(miss.get("x", "")) == pytest.approx(svg.x_of(0x300000, 8 * MiB), abs=0.01)


def test_oracle_report_points_at_the_drawing_in_the_scratch_dir(
        ci_run: tuple[Project, pytest.RunResult]) -> None:
    project, result = ci_run
    # with CI set pytest does not truncate the short summary, which repeats the line
    (line,) = {ln for ln in result.outlines if ln.startswith("the disk as the oracle saw it:")}
    drawing = Path(line.rsplit(": ", 1)[1])
    assert drawing.name == "oracle.svg" and drawing.is_relative_to(project.root / "tmp")
    assert drawing.read_text() == (project.root / "out" / "artifacts" /
                                   "cases-test_demo.py--test_oracle" / "oracle.svg").read_text()


def test_annotations_sit_on_the_case_line(ci_run: tuple[Project, pytest.RunResult]) -> None:
    project, result = ci_run
    source = (project.root / "cases" / "test_demo.py").read_text().splitlines()
    check_line = source.index('    qio.check_live(vm, "drive0")') + 1
    golden_def = source.index("def test_golden(qio: Case) -> None:") + 1
    found = {m.group(2): int(m.group(1)) for m in (
        re.match(r"::error file=cases/test_demo.py,line=(\d+),title=cases/test_demo.py"
                 r"%3A%3A(\w+) failed::", ln) for ln in result.outlines) if m}
    # the oracle failed inside the harness: the annotation is on the case's own call;
    # a golden mismatch is found after the body, so it is on the test's def line
    assert found == {"test_oracle": check_line, "test_golden": golden_def}
    (oracle,) = [ln for ln in result.outlines if "test_oracle failed::" in ln]
    assert "missing [0x300000+0x20000]" in oracle and "\n" not in oracle


def test_step_summary_is_a_table_failures_first(ci_run: tuple[Project, pytest.RunResult]
                                                 ) -> None:
    project, _ = ci_run
    text = (project.root / "summary.md").read_text()
    assert text.startswith("### qiotests: 2 failed, 1 passed")
    assert "qemu: " in text  # which QEMU ran
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [
        "cases/test_demo.py::test_golden", "cases/test_demo.py::test_oracle",
        "cases/test_demo.py::test_passes"]
    assert "❌ failed | GoldenMismatch: output differs from expected/demo.out" in rows[0]
    assert "OracleFailure: bitmap 'b' on 'drive0' (live)" in rows[1]
    assert re.search(r"✅ passed \|  \| \d+\.\d\d s \|$", rows[2])


def test_outside_github_actions_nothing_is_annotated(project: Project) -> None:
    """No GITHUB_ACTIONS: no workflow commands. A failing test without ``qio`` still gets
    its failure.txt; a passing one nothing."""
    project.case("plain", "def test_ok() -> None:\n    pass\n\n\n"
                          "def test_fails() -> None:\n    assert 1 == 2\n")
    result = project.run("--artifacts=out")
    result.assert_outcomes(passed=1, failed=1)
    assert not [ln for ln in result.outlines if ln.startswith("::")]
    assert [p.name for p in (project.root / "out").iterdir()] == ["cases-test_plain.py--test_fails"]
    (only,) = (project.root / "out").iterdir()
    assert [p.name for p in only.iterdir()] == ["failure.txt"]
    assert "assert 1 == 2" in (only / "failure.txt").read_text()


def test_passing_run_writes_no_artifacts_dir(project: Project) -> None:
    project.case("plain", "def test_ok() -> None:\n    pass\n")
    project.run("--artifacts=out", "-n", "2").assert_outcomes(passed=1)
    assert not (project.root / "out").exists()
