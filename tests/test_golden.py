"""harness.golden: the expected/ file format, compare with its diff, and --regen's store."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.errors import GoldenError
from harness.golden import (
    GoldenFile,
    GoldenMismatch,
    RegenStore,
    compare,
    diff,
    golden_path_for,
    header,
    is_section_header,
    parse,
    section_name,
)

TEXT = """\
=== test_restart ===
{"execute": "block-dirty-bitmap-add", "arguments": {"name": "b0", "node": "drive0"}}
{"return": {}}

=== test_empty ===

=== test_trailing_blank ===
qemu-io drive0: write -P 0x11 0 64k


=== test_reopen[ro] ===
a

b

"""

SECTIONS = {
    "test_restart": '{"execute": "block-dirty-bitmap-add", "arguments": '
                    '{"name": "b0", "node": "drive0"}}\n{"return": {}}\n',
    "test_empty": "",
    "test_trailing_blank": "qemu-io drive0: write -P 0x11 0 64k\n\n",
    "test_reopen[ro]": "a\n\nb\n",
}


def test_parse_splits_sections_in_file_order() -> None:
    parsed = parse(TEXT, "x.out")
    assert parsed == SECTIONS
    assert list(parsed) == list(SECTIONS)


def test_render_parse_round_trip(tmp_path: Path) -> None:
    golden = GoldenFile(tmp_path / "x.out", dict(SECTIONS))
    assert golden.render() == TEXT
    golden.write()
    assert GoldenFile.load(golden.path).sections == SECTIONS
    # a section whose story ends with blank lines keeps them, however many
    for body in ("", "\n", "x\n", "x\n\n", "x\n\n\n", "\n\nx\n"):
        g = GoldenFile(tmp_path / "y.out", {"test_a": body, "test_b": body})
        assert parse(g.render(), "y.out") == {"test_a": body, "test_b": body}


@pytest.mark.parametrize("nodeid", [
    "cases/test_165.py::TestReopen::test_ro",
    "cases/test_165.py::test_sizes[64 KiB]",
])
def test_sections_of_every_test_name_round_trip(nodeid: str, tmp_path: Path) -> None:
    name = section_name(nodeid)
    golden = GoldenFile(tmp_path / "165.out", {"test_first": "x\n", name: "y\n"})
    assert parse(golden.render(), "165.out") == {"test_first": "x\n", name: "y\n"}


def test_duplicate_header_is_an_error() -> None:
    text = "=== test_a ===\nx\n\n=== test_b ===\ny\n\n=== test_a ===\nz\n"
    with pytest.raises(GoldenError, match=r"^x\.out:7: section '=== test_a ===' appears twice$"):
        parse(text, "x.out")


@pytest.mark.parametrize("text", ["stray line\n=== test_a ===\nx\n", "\n=== test_a ===\nx\n"])
def test_text_before_the_first_header_is_an_error(text: str) -> None:
    with pytest.raises(GoldenError, match=r"^x\.out:1: text before the first"):
        parse(text, "x.out")


def test_missing_section_names_file_header_and_regen(tmp_path: Path) -> None:
    path = tmp_path / "165.out"
    path.write_text("=== test_a ===\nx\n\n")
    with pytest.raises(GoldenError) as ei:
        GoldenFile.load(path).section("test_b")
    msg = str(ei.value)
    assert str(path) in msg and "'=== test_b ==='" in msg and "--regen" in msg


def test_missing_file_says_so(tmp_path: Path) -> None:
    golden = GoldenFile.load(tmp_path / "nope.out")
    assert golden.sections == {}
    with pytest.raises(GoldenError, match="does not exist") as ei:
        golden.section("test_a")
    assert str(tmp_path / "nope.out") in str(ei.value) and "--regen" in str(ei.value)


def test_compare_mismatch_saves_actual_and_raises_a_unified_diff(tmp_path: Path) -> None:
    golden = tmp_path / "expected" / "165.out"
    golden.parent.mkdir()
    golden.write_text("=== test_a ===\none\ntwo\nthree\n\n=== test_b ===\nb\n\n")
    actual_file = tmp_path / "scratch" / "165.out.actual"
    with pytest.raises(GoldenMismatch) as ei:
        compare(golden, "test_a", "one\nTWO\nthree\n", actual_file, label="expected/165.out")
    assert isinstance(ei.value, AssertionError) and isinstance(ei.value, GoldenError)
    assert actual_file.read_text() == "one\nTWO\nthree\n"
    lines = str(ei.value).splitlines()
    assert "--- expected/165.out (=== test_a ===)" in lines
    assert f"+++ {actual_file}" in lines
    assert "@@ -1,3 +1,3 @@" in lines
    assert lines[lines.index("-two"):lines.index("-two") + 2] == ["-two", "+TWO"]
    assert " one" in lines and " three" in lines
    assert f"actual output saved in {actual_file}" in str(ei.value)
    assert "--regen" in lines[-1]
    # the golden file itself is never touched by a comparison
    assert golden.read_text() == "=== test_a ===\none\ntwo\nthree\n\n=== test_b ===\nb\n\n"


def test_compare_match_removes_a_stale_actual(tmp_path: Path) -> None:
    golden = tmp_path / "165.out"
    golden.write_text("=== test_a ===\none\n\n")
    actual_file = tmp_path / "165.out.actual"
    actual_file.write_text("stale\n")
    compare(golden, "test_a", "one\n", actual_file)
    assert not actual_file.exists()
    compare(golden, "test_a", "one\n", actual_file)  # nothing to remove: still fine


def test_compare_a_trailing_blank_line_is_a_difference(tmp_path: Path) -> None:
    golden = tmp_path / "165.out"
    golden.write_text("=== test_a ===\none\n\n")
    with pytest.raises(GoldenMismatch, match=r"\n\+\n"):
        compare(golden, "test_a", "one\n\n", tmp_path / "a.actual")


def test_compare_missing_section_is_not_a_mismatch(tmp_path: Path) -> None:
    golden = tmp_path / "165.out"
    golden.write_text("=== test_a ===\none\n\n")
    with pytest.raises(GoldenError, match="--regen") as ei:
        compare(golden, "test_b", "x\n", tmp_path / "b.actual")
    assert not isinstance(ei.value, GoldenMismatch)


def test_diff_is_empty_for_equal_texts() -> None:
    assert diff("a\nb\n", "a\nb\n", "x", "y") == ""
    assert diff("a\n", "b\n", "x", "y").startswith("--- x\n+++ y\n")


def test_regen_rewrites_only_recorded_sections_keeps_order_appends_new(tmp_path: Path) -> None:
    path = tmp_path / "expected" / "165.out"
    path.parent.mkdir()
    old = ("=== test_b ===\nold b\n\n=== test_a ===\nold a\n\n\n"
           "=== test_c ===\nhand-written  c, kept byte for byte\n\n")
    path.write_text(old)
    store = RegenStore()
    store.record(path, "test_a", "new a\n")
    store.record(path, "test_new", "brand new\n")
    store.record(path, "test_a", "newer a\n")  # the last record wins
    assert store.write_all() == [(path, ["test_a", "test_new"])]
    assert path.read_text() == (
        "=== test_b ===\nold b\n\n=== test_a ===\nnewer a\n\n"
        "=== test_c ===\nhand-written  c, kept byte for byte\n\n"
        "=== test_new ===\nbrand new\n\n"
    )
    assert store.write_all() == []  # the store is empty after writing


def test_regen_without_changes_does_not_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "165.out"
    path.write_text("=== test_a ===\nsame\n\n")
    before = path.stat()
    store = RegenStore()
    store.record(path, "test_a", "same\n")
    assert store.write_all() == [(path, [])]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_regen_creates_a_new_file_and_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "expected" / "new.out"
    store = RegenStore()
    store.record(path, "test_a", "a\n")
    store.write_all()
    assert path.read_text() == "=== test_a ===\na\n\n"


def test_regen_writes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "165.out"
    path.write_text("=== test_a ===\nold\n\n")
    inode = path.stat().st_ino
    store = RegenStore()
    store.record(path, "test_a", "new\n")
    store.write_all()
    assert path.read_text() == "=== test_a ===\nnew\n\n"
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["165.out"]  # no temp file left


def test_regen_failure_leaves_the_old_file_whole(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "165.out"
    path.write_text("=== test_a ===\nold\n\n")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    store = RegenStore()
    store.record(path, "test_a", "new\n")
    assert store.write_all() == []  # one file that cannot be written does not stop others
    assert store.problems == [f"{path}: cannot write it (No space left on device)"]
    assert path.read_text() == "=== test_a ===\nold\n\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["165.out"]


def test_regen_keeps_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "165.out"
    path.write_text("=== test_a ===\nold\n\n")
    path.chmod(0o644)
    store = RegenStore()
    store.record(path, "test_a", "new\n")
    store.write_all()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_orphans_in_file_order(tmp_path: Path) -> None:
    names = ["test_c", "test_a", "test_b", "test_d"]
    golden = GoldenFile(tmp_path / "x.out", dict.fromkeys(names, ""))
    assert golden.orphans(["test_a", "test_d", "test_not_in_file"]) == ["test_c", "test_b"]
    assert golden.orphans(golden.sections) == []


def test_updated_is_a_copy() -> None:
    golden = GoldenFile(Path("x.out"), {"test_a": "a\n"})
    new = golden.updated({"test_a": "A\n", "test_b": "b\n"})
    assert golden.sections == {"test_a": "a\n"}
    assert new.sections == {"test_a": "A\n", "test_b": "b\n"}


@pytest.mark.parametrize(("module", "golden"), [
    ("cases/test_165.py", "expected/165.out"),
    ("cases/test_bitmap_crash.py", "expected/bitmap_crash.out"),
])
def test_golden_path_for(module: str, golden: str) -> None:
    assert golden_path_for(Path(module), Path("expected")) == Path(golden)


@pytest.mark.parametrize(("nodeid", "name"), [
    ("cases/test_165.py::test_restart", "test_restart"),
    ("cases/test_165.py::test_reopen[ro-64k]", "test_reopen[ro-64k]"),
    ("cases/test_165.py::TestReopen::test_ro", "TestReopen.test_ro"),
])
def test_section_name(nodeid: str, name: str) -> None:
    assert section_name(nodeid) == name


def test_header_recognition() -> None:
    assert header("test_a[x-1]") == "=== test_a[x-1] ==="
    assert is_section_header("=== test_a[x-1] ===")
    for line in ("=== test_a", "=== other ===", " === test_a ===", "=== test_a === "):
        assert not is_section_header(line)
