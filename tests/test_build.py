"""``harness.build`` and ``qiotests build-qemu`` without building QEMU.

The pure parts (first error of a log, stamps, reuse decisions, meson needs, configure
flags) are tested directly; the command end to end runs on a fake source tree whose
``configure`` writes a real ``build.ninja`` for the real ninja, whose "compiler" is a shell
script: one that prints a gcc error, one that writes the five programs as scripts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import build as qbuild
from harness import processes
from harness.build import Reuse, first_error, reuse_decision, stamp_text
from tests.conftest import (
    CHILD_REPORT,
    REPO,
    child_report,
    fake_program,
    leaves_a_grandchild,
    wait_pid_gone,
)

NINJA_LOG = """\
[1/1551] Generating qemu-version.h with a custom command (wrapped by meson to capture output)
[2/1551] Compiling C object libqemuutil.a.p/util_osdep.c.o
../../src/7.2/util/osdep.c: In function 'qemu_write_full':
../../src/7.2/util/osdep.c:12:5: warning: unused variable 'x' [-Wunused-variable]
[3/1551] Compiling C object libblock.fa.p/block.c.o
FAILED: libblock.fa.p/block.c.o
cc -m64 -Ilibblock.fa.p -c ../../src/7.2/block.c
../../src/7.2/block.c: In function 'bdrv_open_child':
../../src/7.2/block.c:3612:9: error: 'parent' undeclared (first use in this function)
 3612 |         parent = NULL;
      |         ^~~~~~
../../src/7.2/block.c:3612:9: note: each undeclared identifier is reported only once
../../src/7.2/block.c:3620:1: error: expected ';' before '}' token
[4/1551] Compiling C object libblock.fa.p/block_qcow2.c.o
ninja: build stopped: subcommand failed.
"""


def test_first_error_is_the_first_compiler_error_with_its_context() -> None:
    assert first_error(NINJA_LOG) == textwrap.dedent("""\
        ../../src/7.2/block.c: In function 'bdrv_open_child':
        ../../src/7.2/block.c:3612:9: error: 'parent' undeclared (first use in this function)
         3612 |         parent = NULL;
              |         ^~~~~~
        ../../src/7.2/block.c:3612:9: note: each undeclared identifier is reported only once""")


def test_first_error_of_a_failed_configure_is_meson_s() -> None:
    log = ("Run-time dependency slirp found: YES 4.7.0\n\n"
           "../../src/10.0/pc-bios/meson.build:112:2: ERROR: File bios.bin does not exist.\n\n"
           "A full log can be found at /b/meson-logs/meson-log.txt\n\nERROR: meson setup failed\n")
    assert first_error(log) == ("../../src/10.0/pc-bios/meson.build:112:2: ERROR: File bios.bin "
                                "does not exist.")


def test_first_error_of_a_link_failure_and_of_anything_else() -> None:
    log = ("[1550/1551] Linking target qemu-img\nFAILED: qemu-img\n"
           "/usr/bin/ld: libblock.fa.p/block.c.o: in function `bdrv_open':\n"
           "block.c:(.text+0x1f): undefined reference to `bdrv_gone'\n"
           "collect2: error: ld returned 1 exit status\n")
    assert first_error(log) == ("/usr/bin/ld: libblock.fa.p/block.c.o: in function `bdrv_open':\n"
                                "block.c:(.text+0x1f): undefined reference to `bdrv_gone'")
    assert first_error("a\nb\n\nc\n") == "a\nb\nc"
    assert first_error("") == "(the log is empty)"


def test_stamp_text_is_the_one_build_qemu_sh_wrote() -> None:
    # build dirs made by the former scripts/build-qemu.sh must stay reusable
    text = stamp_text(Path("/q/src"), "12 1733.5", "7.2.0", ["--a", "--b=c d"])
    assert text == "src=/q/src\nsrc_id=12 1733.5\nversion=7.2.0\nconfigure=--a --b=c d\n"


def test_reuse_decision(tmp_path: Path) -> None:
    build = tmp_path / "build"
    assert reuse_decision(build, "S") is Reuse.FRESH
    build.mkdir()
    assert reuse_decision(build, "S") is Reuse.FRESH
    (build / "foreign.txt").write_text("")
    assert reuse_decision(build, "S") is Reuse.REFUSE
    (build / qbuild.STAMP).write_text("configuring\n")   # an interrupted configure
    assert reuse_decision(build, "S") is Reuse.WIPE
    (build / qbuild.STAMP).write_text("S")
    assert reuse_decision(build, "S") is Reuse.WIPE      # no build.ninja yet
    (build / "build.ninja").write_text("")
    assert reuse_decision(build, "S") is Reuse.REUSE
    assert reuse_decision(build, "other flags") is Reuse.WIPE


def test_a_dir_configured_without_ccache_is_reused(tmp_path: Path) -> None:
    # ccache and --disable-install-blobs change nothing that was compiled: no rebuild
    old = stamp_text(Path("/s"), "1 2.0", "7.2.0", ["--target-list=x86_64-softmmu", "--a=b c"])
    new = stamp_text(Path("/s"), "1 2.0", "7.2.0", [
        "--target-list=x86_64-softmmu", "--a=b c", "--disable-install-blobs",
        "--cc=/root/.cache/qiotests/ccache-bin/cc", "--cxx=/root/.cache/qiotests/ccache-bin/c++"])
    (tmp_path / qbuild.STAMP).write_text(old)
    (tmp_path / "build.ninja").write_text("")
    assert reuse_decision(tmp_path, new) is Reuse.REUSE
    python = stamp_text(Path("/s"), "1 2.0", "7.2.0", [
        "--target-list=x86_64-softmmu", "--a=b c", "--python=/v/bin/python3"])
    assert reuse_decision(tmp_path, python) is Reuse.WIPE
    # "ccache cc" as one --cc made configure miss the option ROM compiler: not neutral
    spaced = stamp_text(Path("/s"), "1 2.0", "7.2.0", [
        "--target-list=x86_64-softmmu", "--a=b c", "--cc=ccache cc"])
    assert reuse_decision(tmp_path, spaced) is Reuse.WIPE


def test_ccache_links_are_one_word_compilers(tmp_path: Path) -> None:
    links = qbuild.ccache_compilers(tmp_path)
    if shutil.which("ccache") is None:
        assert links is None
        return
    assert links is not None
    assert [p.name for p in links] == ["cc", "c++"]
    assert all(p.resolve() == Path(shutil.which("ccache") or "").resolve() for p in links)
    assert qbuild.ccache_compilers(tmp_path) == links       # idempotent


def test_meson_need_from_pythondeps() -> None:
    deps = ('[meson]\nmeson = { accepted = ">=1.5.0", installed = "1.9.0", canary = "meson" }\n'
            '[docs]\nsphinx = { accepted = ">=3.4.3" }\n')
    assert qbuild.meson_need(deps) == qbuild.MesonNeed("1.5.0", "1.9.0")
    assert qbuild.meson_need('[meson]\nmeson = { accepted = ">=1.1" }\n') == \
        qbuild.MesonNeed("1.1", "1.1")
    assert qbuild.meson_need("[docs]\n") is None
    assert qbuild.meson_need("not toml [") is None
    assert qbuild.parse_version("1.0.1\n") == (1, 0, 1) < qbuild.parse_version("1.5.0")


def fake_tree(root: Path, configure: str) -> Path:
    src = root / "qemu"
    src.mkdir()
    (src / "VERSION").write_text("9.9.9\n")
    (src / "meson.build").write_text("project('qemu')\n")
    fake_program(src / "configure", configure)
    return src


def test_configure_flags_follow_what_the_tree_has(tmp_path: Path) -> None:
    src = qbuild.SourceTree.inspect(fake_tree(tmp_path, ""))
    links = (Path("/c/ccache-bin/cc"), Path("/c/ccache-bin/c++"))
    flags = qbuild.configure_flags(src, Path("/v/bin/python3"), links)
    assert "--disable-install-blobs" in flags          # no pc-bios/bios-256k.bin
    assert {"--cc=/c/ccache-bin/cc", "--cxx=/c/ccache-bin/c++",
            "--python=/v/bin/python3"} <= set(flags)
    (src.path / "pc-bios").mkdir()
    (src.path / "pc-bios" / "bios-256k.bin").write_text("")
    with_blobs = qbuild.SourceTree.inspect(src.path)
    assert qbuild.configure_flags(with_blobs, None, None) == list(qbuild.BASE_FLAGS)
    gcov = qbuild.configure_flags(with_blobs, None, None, gcov=True)
    assert gcov == [*qbuild.BASE_FLAGS, "--enable-gcov"]   # in the stamp: never mixed


def test_edk2_placeholders_only_when_meson_would_check_them(tmp_path: Path) -> None:
    pc = tmp_path / "pc-bios"
    pc.mkdir()
    block = ("if unpack_edk2_blobs{}\n  fds = [\n    'edk2-a-code.fd',\n    'edk2-b.fd',\n"
             "  ]\nendif\n")
    (pc / "meson.build").write_text(block.format(""))
    (pc / "edk2-b.fd.bz2").write_text("")
    assert qbuild.edk2_placeholders(tmp_path) == [pc / "edk2-a-code.fd.bz2"]
    (pc / "meson.build").write_text(block.format(" and false"))   # Debian's patch
    assert qbuild.edk2_placeholders(tmp_path) == []


def test_ccache_hits_between_two_snapshots() -> None:
    before = qbuild.parse_ccache_stats("direct_cache_hit\t10\ncache_miss\t5\nstats_updated\tx\n")
    after = qbuild.parse_ccache_stats("direct_cache_hit\t90\npreprocessed_cache_hit\t3\n"
                                      "cache_miss\t6\n")
    assert qbuild.ccache_hits(before, after) == (83, 1)


# -- the command, on a fake tree, with the real ninja ---------------------------------------

# configure: a build.ninja whose one rule runs $src/cc (a script) for every target
CONFIGURE = textwrap.dedent("""\
    src=$(cd "$(dirname "$0")" && pwd)
    echo "configure $*" >> "$src/configure.calls"
    cat > build.ninja <<EOF
    rule cc
      command = sh $src/cc \\$out
    build qemu-system-x86_64: cc
    build qemu-img: cc
    build qemu-io: cc
    build qemu-nbd: cc
    build storage-daemon/qemu-storage-daemon: cc
    EOF
    """)
PROGRAM = '#!/bin/sh\\ncase "$1" in -L) echo "$(dirname "$0")/qemu-bundle/share";; ' \
          '--version) echo "fake 9.9.9";; esac\\n'
GOOD_CC = f'mkdir -p "$(dirname "$1")"; printf \'{PROGRAM}\' > "$1"; chmod +x "$1"\n'
BAD_CC = ('echo "../qemu/block.c: In function \'f\':"\n'
          'echo "../qemu/block.c:7:3: error: expected \';\' before \'}\' token"\n'
          'echo "    7 |   x"\nexit 1\n')


needs_ninja = pytest.mark.skipif(shutil.which("ninja") is None,
                                 reason="ninja is not installed (apt-get install ninja-build)")


def qiotests(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", "build-qemu", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


@needs_ninja
def test_build_qemu_builds_then_reuses(tmp_path: Path) -> None:
    src = fake_tree(tmp_path, CONFIGURE)
    (src / "cc").write_text(GOOD_CC)
    build = tmp_path / "build"
    cp = qiotests(str(src), "--build", str(build), "--no-install-deps")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert f"source {src}: QEMU 9.9.9" in cp.stdout
    assert "configured afresh" in cp.stdout
    assert "ccache " in cp.stdout
    assert "built fake 9.9.9" in cp.stdout
    assert (build / "qemu-storage-daemon").resolve() == \
        build / "storage-daemon" / "qemu-storage-daemon"
    assert (build / "qemu-bundle" / "share").is_dir()   # where -L help said it looks
    cp = qiotests(str(src), "--build", str(build), "--no-install-deps")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "reused (same tree, same flags): configure skipped" in cp.stdout
    assert len((src / "configure.calls").read_text().splitlines()) == 1


@needs_ninja
def test_build_qemu_failure_prints_the_first_error_and_exits_1(tmp_path: Path) -> None:
    src = fake_tree(tmp_path, CONFIGURE)
    (src / "cc").write_text(BAD_CC)
    cp = qiotests(str(src), "--build", str(tmp_path / "build"), "--no-install-deps")
    assert cp.returncode == 1
    assert "Traceback" not in cp.stderr
    assert "build-qemu: build failed (exit status 1); full log: " in cp.stderr
    assert ("build-qemu: first error:\n"
            "    ../qemu/block.c: In function 'f':\n"
            "    ../qemu/block.c:7:3: error: expected ';' before '}' token\n"
            "        7 |   x\n") in cp.stderr


def test_build_qemu_failed_configure_exits_1(tmp_path: Path) -> None:
    src = fake_tree(tmp_path, 'echo "ERROR: glib-2.56 gthread-2.0 is required"; exit 1')
    build = tmp_path / "build"
    cp = qiotests(str(src), "--build", str(build), "--no-install-deps")
    assert cp.returncode == 1
    assert "configure failed (exit status 1)" in cp.stderr
    assert "    ERROR: glib-2.56 gthread-2.0 is required" in cp.stderr
    # the stamp says "configuring": the next run configures again, not reuses
    assert reuse_decision(build, "anything") is Reuse.WIPE


@pytest.mark.parametrize(("make", "words"), [
    (lambda t: t / "none", ["no source tree at", "none"]),
    (lambda t: t, ["is not a QEMU source tree"]),
])
def test_build_qemu_bad_source_is_one_sentence(tmp_path: Path, make: object,
                                               words: list[str]) -> None:
    cp = qiotests(str(make(tmp_path)), "--no-install-deps")  # type: ignore[operator]
    assert cp.returncode == 2
    assert cp.stdout == ""
    assert len(cp.stderr.splitlines()) == 1, cp.stderr
    assert all(w in cp.stderr for w in words), cp.stderr


def test_build_qemu_refuses_a_foreign_build_dir(tmp_path: Path) -> None:
    src = fake_tree(tmp_path, CONFIGURE)
    build = tmp_path / "mine"
    build.mkdir()
    (build / "notes.txt").write_text("keep me")
    cp = qiotests(str(src), "--build", str(build), "--no-install-deps")
    assert cp.returncode == 2
    assert "is not empty and was not made by build-qemu" in cp.stderr
    assert (build / "notes.txt").read_text() == "keep me"
    cp = qiotests(str(src), "--build", str(src / "b"), "--no-install-deps")
    assert cp.returncode == 2
    assert "must be outside the source tree" in cp.stderr


@needs_ninja
def test_edk2_placeholders_only_after_configure_asks_for_them(tmp_path: Path) -> None:
    check = ('[ -f "$(dirname "$0")/pc-bios/edk2-a-code.fd.bz2" ] || { echo "../pc-bios/'
             'meson.build:3:4: ERROR: File edk2-a-code.fd.bz2 does not exist."; exit 1; }\n')
    src = fake_tree(tmp_path, check + CONFIGURE)
    (src / "cc").write_text(GOOD_CC)
    (src / "pc-bios").mkdir()
    (src / "pc-bios" / "meson.build").write_text(
        "if unpack_edk2_blobs\n  fds = [\n    'edk2-a-code.fd',\n  ]\nendif\n")
    cp = qiotests(str(src), "--build", str(tmp_path / "build"), "--no-install-deps")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "1 empty edk2 placeholders in " in cp.stdout
    assert (src / "pc-bios" / "edk2-a-code.fd.bz2").stat().st_size == 0


def test_a_build_step_runs_in_its_own_group_with_the_file_size_limit(tmp_path: Path) -> None:
    """Issue 9 (items 2 and 9): build steps ran through plain subprocess, in our process
    group and without the file-size limit every program the harness starts gets."""
    log = tmp_path / "step.log"
    qbuild._run_logged(CHILD_REPORT, tmp_path, log, None, "probe")
    assert child_report(log) == (processes.max_file_size(), True)


def test_an_interrupted_build_step_takes_its_children_along(tmp_path: Path) -> None:
    """Ctrl-C during a build step: the step's whole group goes (it waited for the step to
    end on its own, and its children ran on)."""
    pidfile = tmp_path / "grandchild.pid"

    def ctrl_c(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qbuild._run_logged(leaves_a_grandchild(pidfile), tmp_path, tmp_path / "step.log",
                           ctrl_c, "probe")
    assert wait_pid_gone(int(pidfile.read_text()))
