"""Golden files: ``expected/<case>.out``, one section per test.

Format (one blank line closes each section)::

    === test_restart ===
    {"execute": "block-dirty-bitmap-add", ...}
    {"return": {}}

    === test_reopen[ro] ===
    ...

A section header is a line ``=== <test name> ===`` where the name starts with ``test`` (or
``Test`` for a test in a class, ``TestX.test_y``) and may contain spaces (parameter ids);
transcripts are not allowed to contain such a line, so the format is unambiguous. Each
test compares only its own section, which is what makes ``-k`` and ``-n`` work. Updating
is explicit (``--regen``) and rewrites only the sections of the tests that ran, keeping
the order of the file and appending new sections at the end.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import GoldenError

_HEADER = re.compile(r"^=== ((?:test|Test)\S(?:.*\S)?) ===$")


def is_section_header(line: str) -> bool:
    return _HEADER.match(line) is not None


def header(name: str) -> str:
    return f"=== {name} ==="


def golden_path_for(case_file: Path, expected_dir: Path) -> Path:
    """``cases/test_165.py`` -> ``expected/165.out``."""
    stem = case_file.stem
    return expected_dir / f"{stem.removeprefix('test_')}.out"


def section_name(nodeid: str) -> str:
    """The section a test owns: its name inside the module, classes joined with dots."""
    inner = nodeid.split("::", 1)[1] if "::" in nodeid else nodeid
    return inner.replace("::", ".")


@dataclass
class GoldenFile:
    """The parsed sections of one golden file, in file order."""

    path: Path
    sections: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> GoldenFile:
        """Parse ``path``; a file that does not exist has no sections.

        A file that cannot be used (unreadable, not UTF-8, stray text, a section twice)
        raises GoldenError naming the file and the line.
        """
        data = _read(path)
        if data is None:
            return cls(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise GoldenError(f"{path}:{line}: byte {data[e.start]:#04x} (column {column}) is "
                              "not UTF-8") from None
        return cls(path, parse(text, str(path)))

    @classmethod
    def salvage(cls, path: Path) -> GoldenFile:
        """The sections that can be told apart in a malformed file, for ``--regen``:
        bytes that are not UTF-8 replaced, text before the first header dropped, the last
        copy of a section kept. Never raises GoldenError."""
        data = _read(path) or b""
        return cls(path, parse(data.decode("utf-8", "replace"), str(path), strict=False))

    def section(self, name: str) -> str:
        if name not in self.sections:
            where = self.path if self.path.exists() else f"{self.path} (the file does not exist)"
            raise GoldenError(
                f"{where} has no section '{header(name)}'; run the test with --regen to "
                "create it, then read it before committing"
            )
        return self.sections[name]

    def updated(self, new: Mapping[str, str]) -> GoldenFile:
        """A copy with ``new`` sections replaced in place, new names appended sorted
        (xdist finishes tests in any order; the file must not depend on it). An empty
        text removes the section: the test no longer logs anything."""
        merged = {n: new.get(n, body) for n, body in self.sections.items()}
        for name in sorted(n for n in new if n not in merged):
            merged[name] = new[name]
        merged = {n: body for n, body in merged.items() if body}
        return GoldenFile(self.path, merged)

    def render(self) -> str:
        return "".join(f"{header(n)}\n{body}\n" for n, body in self.sections.items())

    def write(self) -> None:
        """Write atomically: a crash never leaves a half-written golden file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.render())
            # mkstemp makes 0600 files: keep the old file's mode, or the umask's default
            try:
                mode = self.path.stat().st_mode & 0o777
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def orphans(self, owned: Iterable[str]) -> list[str]:
        """Sections that no test owns."""
        owned_set = set(owned)
        return [n for n in self.sections if n not in owned_set]


def _read(path: Path) -> bytes | None:
    """The file's bytes, None if it does not exist; other errors are one sentence."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GoldenError(f"{path}: cannot read it ({e.strerror})") from None


def parse(text: str, where: str, strict: bool = True) -> dict[str, str]:
    """Split golden text into sections; stray text or duplicate headers are errors
    (with ``strict=False`` stray text is dropped and the last copy of a section kept)."""
    sections: dict[str, str] = {}
    current: str | None = None
    body: list[str] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        m = _HEADER.match(line)
        if m:
            if current is not None:
                sections[current] = _close(body)
            current = m.group(1)
            if current in sections and strict:
                raise GoldenError(f"{where}:{lineno}: section '{header(current)}' appears twice")
            body = []
        elif current is None:
            if strict:
                raise GoldenError(
                    f"{where}:{lineno}: text before the first '=== test... ===' header")
        else:
            body.append(line)
    if current is not None:
        sections[current] = _close(body)
    return sections


def _close(body: list[str]) -> str:
    # one blank line separates sections; it is not part of the section
    if body and body[-1] == "":
        body = body[:-1]
    return "".join(line + "\n" for line in body)


def diff(expected: str, actual: str, expected_label: str, actual_label: str) -> str:
    """A unified diff, empty when the texts are equal."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=expected_label,
            tofile=actual_label,
        )
    )


class GoldenMismatch(GoldenError, AssertionError):
    """The transcript differs from the golden section; the message is the diff."""


def diff_path_for(actual_file: Path) -> Path:
    """Where the diff is saved beside the actual output: ``NAME.out.actual`` ->
    ``NAME.out.diff`` (so ``--artifacts`` and a reviewer find it without the log)."""
    return actual_file.with_suffix(".diff")


def compare(golden: Path, name: str, actual: str, actual_file: Path,
            label: str | None = None) -> None:
    """Compare ``actual`` with section ``name`` of ``golden``; on mismatch save and raise.

    ``label`` is how the golden file is named in the message (a path relative to the
    project, as a reviewer would type it).
    """
    expected = GoldenFile.load(golden).section(name)
    golden_label = label or str(golden)
    diff_file = diff_path_for(actual_file)
    if expected == actual:
        with_suppressed_unlink(actual_file)
        with_suppressed_unlink(diff_file)
        return
    actual_file.parent.mkdir(parents=True, exist_ok=True)
    actual_file.write_text(actual, encoding="utf-8")
    text = diff(expected, actual, f"{golden_label} ({header(name)})", str(actual_file))
    diff_file.write_text(text, encoding="utf-8")
    raise GoldenMismatch(
        f"output differs from {golden_label}, section '{header(name)}':\n{text}"
        f"actual output saved in {actual_file}; if the new output is right, rerun with --regen"
    )


def with_suppressed_unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class RegenStore:
    """Collects new sections during a run and writes each golden file once at the end.

    Under xdist every worker sends its sections to the controller, which alone writes, so
    two workers never race on one file.
    """

    def __init__(self) -> None:
        self._pending: dict[Path, dict[str, str]] = {}
        #: One sentence per golden file that could not be written, for the summary.
        self.problems: list[str] = []
        #: One sentence per malformed golden file rewritten whole from the new sections.
        self.mended: list[str] = []

    def record(self, golden: Path, name: str, text: str) -> None:
        self._pending.setdefault(golden, {})[name] = text

    def write_all(self) -> list[tuple[Path, list[str]]]:
        """Write every touched file; returns (file, changed section names).

        One file that cannot be written never stops the others: its problem goes to
        :attr:`problems`. A malformed file is rewritten from the new sections when they
        replace every section it has (nothing of the old file is then needed); otherwise
        it is left as it is and the problem says which sections did not run.
        """
        written = []
        for path, new in sorted(self._pending.items()):
            try:
                old = GoldenFile.load(path)
                changed = [n for n, t in new.items() if old.sections.get(n, "") != t]
            except GoldenError as e:
                old = GoldenFile.salvage(path)  # keeps the order of its sections
                stale = [n for n in old.sections if n not in new]
                if stale:
                    self.problems.append(
                        f"{e}; not rewritten: {len(stale)} of its sections did not run "
                        f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); fix "
                        "the file, or --regen every test of the module")
                    continue
                self.mended.append(f"{e}; rewritten from the sections that ran")
                # the file itself changes, whatever the sections say
                changed = [n for n, t in new.items() if t or n in old.sections]
            if changed:
                try:
                    old.updated(new).write()
                except OSError as e:
                    self.problems.append(f"{path}: cannot write it ({e.strerror})")
                    continue
            written.append((path, changed))
        self._pending.clear()
        return written
