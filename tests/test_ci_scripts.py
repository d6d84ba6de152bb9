"""The scripts the GitHub workflows call (scripts/ci/), run here as the workflows run them.

Upstream QEMU is out of reach, so the ref finder and the clone run against a local git
repository with tags made in the test; the last-good record lives in a temp dir; the KVM
step runs on a stand-in device node with a stand-in ``udevadm``; the nightly bisect step
with a stand-in ``qiotests``. The workflows themselves are read to check that every
``run:`` step is one call of a make target or of one of these scripts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, fake_program

CI = REPO / "scripts" / "ci"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def sh(*argv: str | Path, env: dict[str, str] | None = None, check: bool = True,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, **GIT_ENV, **(env or {})}, check=False,
                        timeout=120)
    if check and cp.returncode != 0:
        raise AssertionError(f"{argv} exited {cp.returncode}:\n{cp.stdout}\n{cp.stderr}")
    return cp


def git(repo: Path, *args: str) -> str:
    return sh("git", "-C", repo, *args).stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A QEMU-like repository: master with three commits, release tags (annotated and
    lightweight), a release candidate newer than every release, a non-version tag."""
    repo = tmp_path / "upstream"
    sh("git", "init", "-q", "-b", "master", repo)
    for i, tags in enumerate([["v9.2.0", "v10.0.0"], ["v9.10.0", "v10.0.3"],
                              ["v10.1.0-rc1", "nightly", "v2.0.0"]]):
        (repo / "file").write_text(f"{i}\n")
        git(repo, "add", "file")
        git(repo, "commit", "-q", "-m", f"commit {i}")
        for t in tags:
            if t == "v10.0.3":
                git(repo, "tag", t)  # lightweight
            else:
                git(repo, "tag", "-a", "-m", t, t)
    return repo


def refs(upstream: Path, *args: str, env: dict[str, str] | None = None
         ) -> list[dict[str, str]]:
    return list(json.loads(sh(CI / "qemu-refs.sh", upstream, *args, env=env).stdout))


def test_refs_are_the_branch_and_the_latest_release_by_version(upstream: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "github_output"
    matrix = refs(upstream, env={"GITHUB_OUTPUT": str(out)})
    assert matrix == [
        {"name": "master", "ref": "master", "kind": "branch",
         "commit": git(upstream, "rev-parse", "master")},
        # v10.0.3 beats v9.10.0 and v2.0.0 (version sort), the -rc is no release
        {"name": "v10.0.3", "ref": "v10.0.3", "kind": "tag",
         "commit": git(upstream, "rev-parse", "v10.0.3^{commit}")},
    ]
    assert out.read_text() == f"matrix={json.dumps(matrix, separators=(',', ':'))}\n"


def test_an_annotated_tag_resolves_to_its_commit_not_the_tag_object(upstream: Path) -> None:
    git(upstream, "tag", "-a", "-m", "newer", "v10.0.10", "master~1")
    (_, stable) = refs(upstream)
    assert stable["name"] == "v10.0.10"
    assert stable["commit"] == git(upstream, "rev-parse", "master~1")
    assert stable["commit"] != git(upstream, "rev-parse", "v10.0.10")


def test_refs_for_a_tag_a_commit_and_bad_input(upstream: Path) -> None:
    assert refs(upstream, "v10.0.3") == [
        {"name": "v10.0.3", "ref": "v10.0.3", "kind": "tag",
         "commit": git(upstream, "rev-parse", "v10.0.3")}]
    sha = git(upstream, "rev-parse", "master~2")
    assert refs(upstream, sha)[0] == {"name": sha[:12], "ref": sha, "kind": "commit",
                                      "commit": sha}
    cp = sh(CI / "qemu-refs.sh", upstream, "stable-9.9", check=False)
    assert cp.returncode == 1 and cp.stdout == ""
    assert f"qemu-refs: {upstream} has no branch or tag 'stable-9.9'" in cp.stderr
    cp = sh(CI / "qemu-refs.sh", upstream, 'x"; rm -rf /', check=False)
    assert cp.returncode == 2 and "is not a branch, tag or commit name" in cp.stderr
    cp = sh(CI / "qemu-refs.sh", upstream.parent / "missing", check=False)
    assert cp.returncode == 1 and "cannot list the refs of" in cp.stderr


def test_fetch_checks_out_the_commit_with_history_and_reuses_the_clone(upstream: Path,
                                                                      tmp_path: Path) -> None:
    src = tmp_path / "qemu-src"
    head = git(upstream, "rev-parse", "master")
    sh(CI / "fetch-qemu.sh", upstream, "master", head, src)
    assert git(src, "rev-parse", "HEAD") == head
    # the history a bisect from an older commit needs is there
    assert git(src, "rev-list", "--count", "HEAD") == "3"
    (src / "leftover.o").write_text("from the last build")
    tag_commit = git(upstream, "rev-parse", "v10.0.0^{commit}")
    sh(CI / "fetch-qemu.sh", upstream, "v10.0.0", tag_commit, src)
    assert git(src, "rev-parse", "HEAD") == tag_commit
    assert not (src / "leftover.o").exists()


def test_last_good_is_kept_per_repository_and_branch(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lg = CI / "last-good.sh"
    assert sh(lg, "get", state, "https://q/qemu.git", "master").stdout == ""
    sha = "a" * 40
    sh(lg, "set", state, "https://q/qemu.git", "master", sha)
    assert sh(lg, "get", state, "https://q/qemu.git", "master").stdout == sha + "\n"
    # a record restored for another repository or branch is not this one's
    assert sh(lg, "get", state, "https://other/qemu.git", "master").stdout == ""
    assert sh(lg, "get", state, "https://q/qemu.git", "stable-10.0").stdout == ""
    sh(lg, "set", state, "https://q/qemu.git", "master", "b" * 40)
    assert sh(lg, "get", state, "https://q/qemu.git", "master").stdout == "b" * 40 + "\n"
    cp = sh(lg, "set", state, "https://q/qemu.git", "master", "HEAD", check=False)
    assert cp.returncode == 2 and "'HEAD' is not a full commit hash" in cp.stderr
    assert sorted(p.name for p in state.iterdir()) == ["last-good"]


def test_enable_kvm_without_a_device_says_tcg(tmp_path: Path) -> None:
    cp = sh(CI / "enable-kvm.sh", env={"KVM_DEVICE": str(tmp_path / "kvm")})
    assert cp.stdout == f"enable-kvm: no {tmp_path / 'kvm'} on this machine: the cases will " \
        "run under TCG\n"


def test_enable_kvm_dry_run_prints_the_rule_and_the_udev_calls(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    cp = sh(CI / "enable-kvm.sh", "--dry-run",
            env={"KVM_DEVICE": str(dev), "UDEV_RULES_DIR": str(tmp_path / "rules")})
    rule = 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"'
    assert cp.stdout.splitlines() == [
        f"enable-kvm: {dev} exists; rule {tmp_path}/rules/99-qiotests-kvm.rules: {rule}",
        f"+ echo '{rule}' > {tmp_path}/rules/99-qiotests-kvm.rules",
        "+ udevadm control --reload-rules",
        "+ udevadm trigger --name-match=kvm",
    ]
    assert not (tmp_path / "rules").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="writes the rule as root (else it uses sudo)")
def test_enable_kvm_writes_the_rule_and_triggers_udev(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    (tmp_path / "rules").mkdir()
    calls = tmp_path / "udevadm.calls"
    fake_program(tmp_path / "bin" / "udevadm", f'echo "$*" >> {calls}')
    sh(CI / "enable-kvm.sh", env={"KVM_DEVICE": str(dev), "UDEV_RULES_DIR": str(tmp_path / "rules"),
                                  "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert (tmp_path / "rules" / "99-qiotests-kvm.rules").read_text() == \
        'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"\n'
    assert calls.read_text().splitlines() == ["control --reload-rules",
                                              "trigger --name-match=kvm"]


# --- the nightly bisect step ---------------------------------------------------------

def bisect_step(tmp_path: Path, upstream: Path, good: str | None, bad: str
                ) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    """Run nightly-bisect.sh with a stand-in ``qiotests`` that records its arguments and
    environment and writes a summary.md the way ``qiotests bisect`` does."""
    state, work = tmp_path / "state", tmp_path / "bisect"
    if good is not None:
        sh(CI / "last-good.sh", "set", state, "https://q/qemu.git", "master", good)
    args = tmp_path / "qiotests.args"
    fake = fake_program(tmp_path / "qiotests", f'''
echo "$* GITHUB_ACTIONS=${{GITHUB_ACTIONS:-unset}}" > {args}
while [ $# -gt 0 ]; do [ "$1" = --workdir ] && work=$2; shift; done
mkdir -p "$work/run-1" && ln -sfn run-1 "$work/last"
printf '## qiotests bisect: found\\n\\n- first bad commit: `c0ffee` block: break it\\n' \\
    > "$work/run-1/summary.md"
''')
    summary = tmp_path / "summary.md"
    summary.write_text("### qiotests: 1 failed\n")
    cp = sh(CI / "nightly-bisect.sh", state, "https://q/qemu.git", "master", upstream, bad,
            work, check=False,
            env={"QIOTESTS": str(fake), "GITHUB_ACTIONS": "true", "JOBS": "2",
                 "GITHUB_STEP_SUMMARY": str(summary), "QEMU_BUILD_DIR": str(tmp_path / "b")})
    return cp, summary.read_text(), args


def test_nightly_bisect_runs_from_the_last_good_commit_and_fills_the_summary(
        upstream: Path, tmp_path: Path) -> None:
    good, bad = git(upstream, "rev-parse", "master~2"), git(upstream, "rev-parse", "master")
    cp, summary, args = bisect_step(tmp_path, upstream, good, bad)
    assert cp.returncode == 0, cp.stderr
    assert args.read_text().split() == [
        "bisect", "--src", str(upstream), "--good", good, "--bad", bad,
        "--workdir", str(tmp_path / "bisect"), "--build", str(tmp_path / "b"),
        "--", "-n", "2", "GITHUB_ACTIONS=unset"]
    # appended after the test table already there
    assert summary.startswith("### qiotests: 1 failed\n## qiotests bisect: found")
    assert "first bad commit: `c0ffee` block: break it" in summary


@pytest.mark.parametrize("case", ["no record", "same commit", "not an ancestor"])
def test_nightly_bisect_says_why_it_does_not_run(upstream: Path, tmp_path: Path,
                                                 case: str) -> None:
    head = git(upstream, "rev-parse", "master")
    if case == "no record":
        good, why = None, "no earlier passing commit is recorded"
    elif case == "same commit":
        good, why = head, "passed before and fails now"
    else:
        git(upstream, "checkout", "-q", "-b", "side", "master~2")
        (upstream / "file").write_text("side\n")
        git(upstream, "commit", "-q", "-am", "side")
        good, why = git(upstream, "rev-parse", "side"), "is not an ancestor of"
    cp, summary, args = bisect_step(tmp_path, upstream, good, head)
    assert cp.returncode == 0, cp.stderr
    assert "## bisect: not run" in summary and why in summary
    assert not args.exists()


def test_build_deps_dry_run_names_only_missing_packages() -> None:
    pytest.importorskip("harness.build", reason="harness.build (qiotests build-qemu) is "
                        "not in this tree yet")
    if not Path("/usr/bin/dpkg-query").exists():
        pytest.skip("not a Debian/Ubuntu machine")
    cp = sh(CI / "build-deps.sh", "--dry-run")
    line = cp.stdout.strip().splitlines()[-1]
    assert line.startswith(("build-deps: all of", "+ "))
    if line.startswith("+ "):
        for pkg in line.split("--no-install-recommends ", 1)[1].split():
            assert sh("dpkg-query", "-W", "-f=${Status}", pkg, check=False).stdout \
                != "install ok installed"


# --- the workflows -------------------------------------------------------------------

def workflow_runs() -> list[tuple[str, str]]:
    yaml = pytest.importorskip("ruamel.yaml", reason="ruamel.yaml comes with the dev extras")
    out = []
    for path in sorted((REPO / ".github" / "workflows").glob("*.yml")):
        doc = yaml.YAML(typ="safe").load(path.read_text())
        for job in doc["jobs"].values():
            for step in job["steps"]:
                if "run" in step:
                    out.append((path.name, str(step["run"]).strip()))
    return out


def test_every_run_step_is_one_make_target_or_one_script_of_this_repo() -> None:
    runs = workflow_runs()
    assert runs
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    for name, run in runs:
        assert "\n" not in run and not re.search(r"[;&|`]|\$\(", run), (name, run)
        word = run.split()[0]
        if word == "make":
            assert run.split()[1] in targets, (name, run)
        else:
            script = REPO / word
            assert word.startswith("scripts/") and os.access(script, os.X_OK), (name, run)
