#!/usr/bin/env python3
"""Planted QEMU bugs: prove that the qiotests cases catch them.

Each bug is a recipe of small edits written by us (file, function, a short anchor string that
must occur exactly once in that function, and what to do there), applied to a hard-linked
copy of a QEMU source tree. No QEMU source or patch is kept in this repository; when a QEMU
version's source no longer matches a recipe, the edit stops and says which anchor is gone.

    planted_bugs.py list                          the bug names
    planted_bugs.py show                          the recipes, in words
    planted_bugs.py check-recipes SRC             do the recipes apply to this tree?
    planted_bugs.py make-tree SRC DEST NAME       cp -al SRC DEST, then plant bug NAME
    planted_bugs.py run --workdir W --source SRC  build pristine + every bug, run the cases
                                                  against each, print the verdict table

`scripts/planted-bugs.sh` fetches Debian's QEMU source and calls `run`; see
docs/planted-bugs.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parent.parent
STAMP = ".qiotests-planted-bug"
MARK = "qiotests planted bug"
_STALE = ": this QEMU source does not match the recipe; update it in scripts/planted_bugs.py"

Action = Literal["replace", "delete-line", "delete-if"]


@dataclass(frozen=True)
class Edit:
    """One edit inside one function of one file of a QEMU tree.

    replace:     the anchor text becomes `text` (extra lines get the anchor line's indent)
    delete-line: the line that is exactly the anchor is removed
    delete-if:   the innermost `if (...) { ... }` holding the anchor is removed
    A comment naming the bug is left where the edit was.
    """

    path: str
    function: str
    anchor: str
    action: Action
    text: str = ""

    def describe(self) -> str:
        where = f"{self.path}, {self.function}():"
        if self.action == "replace":
            new = " ".join(self.text.split())
            return f"{where} replace `{self.anchor}` with `{new}`"
        if self.action == "delete-line":
            return f"{where} delete the statement `{self.anchor}`"
        return f"{where} delete the if-block around `{self.anchor}`"


@dataclass(frozen=True)
class Bug:
    name: str
    summary: str
    edits: tuple[Edit, ...]

    def fingerprint(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# Replaces `hbitmap_set(bitmap->bitmap, offset, bytes);` in bdrv_set_dirty().
_GRANULE_TEXT = """{
    int64_t last = QEMU_ALIGN_DOWN(offset + bytes - 1,
                                   bdrv_dirty_bitmap_granularity(bitmap));
    hbitmap_set(bitmap->bitmap, offset, last > offset ? last - offset : bytes);
}"""

BUGS: tuple[Bug, ...] = (
    Bug(
        "reopen-ro-drop",
        "after a read-only -> read-write reopen the IN_USE flag is not written back, so the "
        "bitmap stored at the rw -> ro reopen stays on disk as valid, the store at close "
        "fails and every write after the rw reopen is lost",
        (Edit("block/qcow2-bitmap.c", "qcow2_reopen_bitmaps_rw",
              "need_header_update = true;", "delete-line"),),
    ),
    Bug(
        "no-inuse-flag",
        "opening an image read-write does not mark its persistent bitmaps IN_USE on disk "
        "(and the store-time check that would refuse such a bitmap is gone), so after a "
        "crash a stale bitmap loads as consistent",
        (
            Edit("block/qcow2-bitmap.c", "qcow2_load_dirty_bitmaps",
                 "needs_update = true;", "delete-line"),
            Edit("block/qcow2-bitmap.c", "qcow2_store_persistent_dirty_bitmaps",
                 "already exists in the image", "delete-if"),
        ),
    ),
    Bug(
        "granule-off-by-one",
        "bdrv_set_dirty() does not mark the last granule of a write that spans more than "
        "one granule",
        (Edit("block/dirty-bitmap.c", "bdrv_set_dirty",
              "hbitmap_set(bitmap->bitmap, offset, bytes);", "replace", _GRANULE_TEXT),),
    ),
    Bug(
        "merge-overwrites",
        "block-dirty-bitmap-merge replaces the target with the first source instead of "
        "OR-ing it in; the target's own bits are lost",
        (Edit("block/dirty-bitmap.c", "bdrv_dirty_bitmap_merge_internal",
              "hbitmap_merge(*backup,", "replace", "hbitmap_merge(dest->bitmap,"),),
    ),
    Bug(
        "migration-enabled-lost",
        "a bitmap migrated with the dirty-bitmaps capability arrives disabled: the "
        "destination reads the enabled flag of the start chunk but never enables the "
        "bitmap, so it silently stops recording writes after the switchover",
        (Edit("migration/block-dirty-bitmap.c", "dirty_bitmap_load_start",
              "b->enabled = flags & DIRTY_BITMAP_MIG_START_FLAG_ENABLED;", "replace",
              "b->enabled = false;"),),
    ),
    Bug(
        "shrink-keeps-bits",
        "shrinking a disk does not clear the bitmap bits past its new end: the dirty "
        "count keeps them (the views of the bitmap disagree) and growing the disk again "
        "brings them back as dirty",
        (Edit("util/hbitmap.c", "hbitmap_truncate",
              "hbitmap_reset(hb, start, fix_count);", "delete-line"),),
    ),
    Bug(
        "truncate-rounds-down",
        "a bitmap resized with its disk rounds its new number of granules down: the "
        "last, partial granule of a disk whose size is no multiple of the granularity "
        "has no bit (a write there, or a shrink to such a size, aborts QEMU)",
        (Edit("util/hbitmap.c", "hbitmap_truncate",
              "size = (size + (1ULL << hb->granularity) - 1) >> hb->granularity;",
              "replace", "size = size >> hb->granularity;"),),
    ),
    Bug(
        "discard-not-dirty",
        "a discard no longer marks the bitmaps of the node: the discarded range reads as "
        "zeroes (or stale data) afterwards, but an incremental backup does not copy it",
        (Edit("block/io.c", "bdrv_co_write_req_finish",
              "case BDRV_TRACKED_DISCARD:", "delete-line"),),
    ),
)
BY_NAME = {b.name: b for b in BUGS}


class RecipeError(Exception):
    """The QEMU source does not match a recipe (or a tree is not ours to touch)."""


# ---------------------------------------------------------------------------------------
# applying recipes


def _function_body(lines: list[str], name: str, where: str) -> tuple[int, int]:
    """Line indexes of the `{` and `}` (both at column 0) of function `name`'s definition."""
    # the name alone at column 0 too (QEMU's style when the return type is long)
    head = re.compile(r"(?:[A-Za-z_].*\b)?" + re.escape(name) + r"\(")
    found: list[tuple[int, int]] = []
    for i, line in enumerate(lines):
        if not head.match(line):
            continue
        j = i
        while j < len(lines) and lines[j].rstrip() != "{":
            if lines[j].rstrip().endswith(";") or j - i > 10:
                break  # a prototype or a call, not a definition
            j += 1
        if j >= len(lines) or lines[j].rstrip() != "{":
            continue
        k = j + 1
        while k < len(lines) and lines[k].rstrip() != "}":
            k += 1
        if k < len(lines):
            found.append((j, k))
    if len(found) != 1:
        raise RecipeError(f"{where}: function {name}() defined {len(found)} times, expected "
                          f"once{_STALE}")
    return found[0]


_STRIP = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|/\*.*?\*/|//.*$')


def _braces(line: str) -> int:
    code = _STRIP.sub("", line)
    return code.count("{") - code.count("}")


def _if_block(lines: list[str], at: int, lo: int, where: str) -> tuple[int, int]:
    """The innermost `if (...) {` ... `}` (lines lo.. ) that contains line `at`."""
    for j in range(at, lo, -1):
        if not re.match(r"\s*if \(.*\{\s*$", lines[j]):
            continue
        depth = 0
        for k in range(j, len(lines)):
            depth += _braces(lines[k])
            if depth == 0:
                break
        else:
            raise RecipeError(f"{where}: unbalanced braces after line {j + 1}")
        if k >= at:
            if lines[k].strip() != "}":
                raise RecipeError(f"{where}: the if-block ends in {lines[k].strip()!r}, "
                                  f"not a lone '}}' (an else branch?){_STALE}")
            return j, k
    raise RecipeError(f"{where}: no if-block around the anchor{_STALE}")


def apply_edit(text: str, edit: Edit, bug: str) -> str:
    """`text` (a whole file) with `edit` applied; RecipeError if the anchor is not unique."""
    where = f"planted bug {bug}: {edit.path}, {edit.function}()"
    lines = text.split("\n")
    lo, hi = _function_body(lines, edit.function, where)
    hits = [i for i in range(lo, hi) for _ in range(lines[i].count(edit.anchor))]
    if len(hits) != 1:
        in_file = text.count(edit.anchor)
        raise RecipeError(
            f"{where}: anchor {edit.anchor!r} found {len(hits)} times in the function "
            f"({in_file} in the file), expected exactly once{_STALE}")
    at = hits[0]
    line = lines[at]
    indent = line[: len(line) - len(line.lstrip())]
    mark = f"/* {MARK} {bug} */"
    if edit.action == "replace":
        new = edit.text.replace("\n", "\n" + indent)
        lines[at : at + 1] = (line.replace(edit.anchor, new) + " " + mark).split("\n")
    elif edit.action == "delete-line":
        if line.strip() != edit.anchor:
            raise RecipeError(f"{where}: the line holding {edit.anchor!r} holds more: "
                              f"{line.strip()!r}{_STALE}")
        lines[at] = f"{indent}{mark}"
    else:
        start, end = _if_block(lines, at, lo, where)
        first = lines[start]
        lines[start : end + 1] = [first[: len(first) - len(first.lstrip())] + mark]
    return "\n".join(lines)


def planted_text(src: Path, bug: Bug) -> dict[str, str]:
    """The edited contents of every file `bug` touches, read from tree `src`."""
    out: dict[str, str] = {}
    for edit in bug.edits:
        path = src / edit.path
        if edit.path not in out:
            if not path.is_file():
                raise RecipeError(f"planted bug {bug.name}: {path} does not exist")
            out[edit.path] = path.read_text(encoding="utf-8", errors="surrogateescape")
        out[edit.path] = apply_edit(out[edit.path], edit, bug.name)
    return out


def check_recipes(src: Path, bugs: Sequence[Bug] = BUGS) -> list[str]:
    """One error line per recipe that does not apply to `src` (empty: all apply)."""
    errors = []
    for bug in bugs:
        try:
            planted_text(src, bug)
        except RecipeError as e:
            errors.append(str(e))
    return errors


def _tree_fingerprint(src: Path, bug: Bug) -> str:
    st = src.stat()  # inode and ctime of the root: a re-extracted pristine tree differs
    return json.dumps({"source": str(src), "source_id": [st.st_ino, st.st_ctime_ns],
                       "bug": bug.fingerprint()})


def make_tree(src: Path, dest: Path, bug: Bug) -> bool:
    """Make `dest` a hard-linked copy of `src` with `bug` planted; False if it already was.

    Only the edited files are un-shared (written to a new inode), so `src` is never changed.
    """
    src = src.resolve()
    want = _tree_fingerprint(src, bug)
    stamp = dest / STAMP
    if dest.exists():
        if stamp.is_file() and stamp.read_text() == want:
            return False
        if not stamp.is_file():
            raise RecipeError(f"{dest} exists and was not made by planted_bugs.py; remove it")
        shutil.rmtree(dest)
    edited = planted_text(src, bug)  # fails before copying anything if a recipe is stale
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    subprocess.run(["cp", "-al", str(src), str(partial)], check=True)
    for rel, text in edited.items():
        target = partial / rel
        tmp = target.with_name(target.name + ".qiotests-tmp")
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        shutil.copymode(src / rel, tmp)
        os.replace(tmp, target)  # a new inode: the pristine file keeps its own
        assert target.stat().st_ino != (src / rel).stat().st_ino
    (partial / STAMP).write_text(want)
    partial.rename(dest)
    return True


# ---------------------------------------------------------------------------------------
# running the cases and reading the results


@dataclass
class Outcome:
    name: str
    returncode: int
    failed: list[str]  # short ids of FAILED and ERROR tests
    summary: str  # pytest's last line, e.g. "3 failed, 40 passed in 500.1s"
    seconds: float

    @property
    def verdict(self) -> str:
        if self.name == "pristine":
            return "PASS" if self.returncode == 0 and not self.failed else "FAIL"
        if self.returncode == 0 and not self.failed:
            return "MISSED"
        if self.returncode == 1 and self.failed:
            return "CAUGHT"
        return f"ERROR (pytest exit {self.returncode})"  # collection/usage/internal error

    @property
    def good(self) -> bool:
        return self.verdict in ("PASS", "CAUGHT")


_RESULT_LINE = re.compile(r"^(FAILED|ERROR) (\S+\.py\S*)")
_SUMMARY = re.compile(r"^=*\s*(.*\b(?:passed|failed|error|errors|skipped|xfailed|xpassed|"
                      r"deselected|no tests ran)\b.* in [0-9.]+s.*?)\s*=*$")


def short_id(nodeid: str) -> str:
    """cases/test_255.py::test_x[p] -> test_255::test_x[p]"""
    path, sep, rest = nodeid.partition("::")
    return Path(path).stem + sep + rest


def parse_results(text: str) -> tuple[list[str], str]:
    failed: list[str] = []
    summary = ""
    for line in text.splitlines():
        m = _RESULT_LINE.match(line)
        if m:
            sid = short_id(m.group(2))
            if sid not in failed:
                failed.append(sid)
        s = _SUMMARY.match(line.strip())
        if s:
            summary = s.group(1)
    failed.sort()
    return failed, summary


def run_cases(name: str, build: Path, out: Path, jobs: int) -> Outcome:
    cmd = [str(REPO / ".venv/bin/pytest"), "cases", "-q", "-n", str(jobs),
           "--qemu-build", str(build), "-p", "no:cacheprovider"]
    t0 = time.monotonic()
    version = subprocess.run([str(build / "qemu-img"), "--version"], capture_output=True,
                             text=True).stdout.split("\n")[0]
    with out.open("w") as f:
        f.write(f"# {name}: {version} from {build}\n")
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    seconds = time.monotonic() - t0
    failed, summary = parse_results(out.read_text(errors="replace"))
    return Outcome(name, rc, failed, summary, seconds)


def grouped(ids: Sequence[str]) -> list[str]:
    """test_m::test_x[a], test_m::test_x[b] -> test_m::test_x[a, b] (or [N params] if N > 3)"""
    params: dict[str, list[str]] = {}
    for t in ids:
        base, _, param = t.partition("[")
        params.setdefault(base, []).append(param.rstrip("]"))
    out = []
    for base, ps in sorted(params.items()):
        named = [p for p in ps if p]
        if len(named) > 3:
            out.append(f"{base}[{len(named)} params]")
        else:
            out.append(f"{base}[{', '.join(sorted(named))}]" if named else base)
    return out


def table(outcomes: Sequence[Outcome], markdown: bool) -> str:
    if markdown:
        rows = ["| build | failing tests | verdict | failing tests (with their parameters) |",
                "| --- | --- | --- | --- |"]
        for o in outcomes:
            cell = "<br>".join(f"`{t}`" for t in grouped(o.failed)) or "-"
            rows.append(f"| {o.name} | {len(o.failed)} | {o.verdict} | {cell} |")
        return "\n".join(rows)
    width = max(len(o.name) for o in outcomes)
    rows = [f"{'build':<{width}}  failed  {'verdict':<8}  failing tests"]
    for o in outcomes:
        ids = o.failed or ["-"]
        rows.append(f"{o.name:<{width}}  {len(o.failed):>6}  {o.verdict:<8}  {ids[0]}")
        rows += [f"{'':<{width}}  {'':>6}  {'':<8}  {t}" for t in ids[1:]]
    return "\n".join(rows)


def _boot_ticks_now() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")


def reap_leftovers(workdir: Path, since_ticks: float) -> list[str]:
    """Kill QEMU processes running a binary under `workdir` that started during this run."""
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            exe = os.readlink(d / "exe")
            start = float((d / "stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            continue
        if exe.startswith(str(workdir) + "/") and start >= since_ticks:
            try:
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(f"{d.name} {exe}")
            except ProcessLookupError:
                pass
    return killed


# ---------------------------------------------------------------------------------------
# the whole proof


def _say(msg: str) -> None:
    print(f"planted-bugs: {msg}", flush=True)


def _build(src: Path, build: Path, log: Path) -> float:
    t0 = time.monotonic()
    with log.open("w") as f:
        jobs = ["--jobs", os.environ["JOBS"]] if os.environ.get("JOBS") else []
        rc = subprocess.run([sys.executable, "-m", "harness.cli", "build-qemu", str(src),
                             "--build", str(build), *jobs], cwd=REPO,
                            stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RecipeError(f"build of {src} in {build} failed (exit {rc}); end of {log}:\n"
                          + "\n".join(tail))
    return time.monotonic() - t0


def _fmt(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run(workdir: Path, source: Path, bugs: Sequence[Bug], jobs: int) -> int:
    t_start = time.monotonic()
    since = _boot_ticks_now()
    workdir = workdir.resolve()
    source = source.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    if not (REPO / ".venv/bin/pytest").exists():
        raise RecipeError(f"no {REPO / '.venv/bin/pytest'}: run scripts/setup.sh first")
    errors = check_recipes(source, bugs)
    if errors:
        for e in errors:
            print(f"planted-bugs: {e}", file=sys.stderr)
        return 2

    builds: list[tuple[str, Path]] = []
    timings: list[str] = []
    for name, bug in [("pristine", None), *[(b.name, b) for b in bugs]]:
        src = source
        if bug is not None:
            src = workdir / f"src-{name}"
            made = make_tree(source, src, bug)
            _say(f"{name}: {'planted in' if made else 'reusing'} {src}")
            for edit in bug.edits:
                _say(f"  {edit.describe()}")
        build = workdir / f"build-{name}"
        log = workdir / "logs" / f"build-{name}.log"
        _say(f"{name}: building in {build} (log: {log})")
        secs = _build(src, build, log)
        timings.append(f"build {name}: {_fmt(secs)}")
        _say(f"{name}: build done in {_fmt(secs)}")
        builds.append((name, build))

    outcomes: list[Outcome] = []
    for name, build in builds:
        out = workdir / f"results-{name}.txt"
        _say(f"{name}: running the cases (output: {out})")
        o = run_cases(name, build, out, jobs)
        timings.append(f"pytest {name}: {_fmt(o.seconds)}")
        _say(f"{name}: {o.summary or 'no pytest summary line'} -> {o.verdict}")
        outcomes.append(o)

    leftovers = reap_leftovers(workdir, since)
    for p in leftovers:
        _say(f"killed a QEMU left running: {p}")
    total = time.monotonic() - t_start
    text = table(outcomes, markdown=False)
    print()
    print(text)
    print()
    print("\n".join(timings))
    print(f"total: {_fmt(total)}")
    ok = all(o.good for o in outcomes) and not leftovers
    (workdir / "summary.md").write_text(
        table(outcomes, markdown=True) + "\n\n"
        + "\n".join(f"- {t}" for t in timings) + f"\n- total: {_fmt(total)}\n"
        + f"- QEMU {(source / 'VERSION').read_text().strip()} from {source.name}\n"
        + f"- measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {os.cpu_count()} CPUs\n")
    _say("OK: pristine passes and every planted bug is caught" if ok
         else "NOT OK: see the table above and the results-*.txt files")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the bug names")
    sub.add_parser("show", help="the recipes in words")
    c = sub.add_parser("check-recipes", help="do the recipes apply to a source tree?")
    c.add_argument("source", type=Path)
    m = sub.add_parser("make-tree", help="hard-linked copy of SRC with bug NAME planted")
    m.add_argument("source", type=Path)
    m.add_argument("dest", type=Path)
    m.add_argument("name", choices=sorted(BY_NAME))
    r = sub.add_parser("run", help="build pristine + bugs, run the cases, print the table")
    r.add_argument("--workdir", type=Path, required=True)
    r.add_argument("--source", type=Path, required=True, help="the pristine QEMU tree")
    r.add_argument("--jobs", type=int, default=2, help="pytest -n (default 2)")
    r.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="just these bugs")
    a = p.parse_args(argv)
    try:
        if a.cmd == "list":
            print("\n".join(BY_NAME))
        elif a.cmd == "show":
            for b in BUGS:
                print(f"{b.name}: {b.summary}")
                for e in b.edits:
                    print(f"  {e.describe()}")
        elif a.cmd == "check-recipes":
            errors = check_recipes(a.source)
            print("\n".join(errors) or f"all {len(BUGS)} recipes apply to {a.source}")
            return 1 if errors else 0
        elif a.cmd == "make-tree":
            made = make_tree(a.source, a.dest, BY_NAME[a.name])
            print(f"{'planted' if made else 'already planted'}: {a.name} in {a.dest}")
        else:
            bugs = [BY_NAME[n] for n in a.only] if a.only else list(BUGS)
            return run(a.workdir, a.source, bugs, a.jobs)
    except RecipeError as e:
        print(f"planted-bugs: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
