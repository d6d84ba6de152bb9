"""The guest: how it is built (no network: fake apt answers, synthetic modules) and, with
a real guest under TCG, the proofs that its checks can fail.

* a guest write the bitmap never saw (recording disabled behind the oracle's back) fails
  the check with the missing range; a write hidden from the oracle (a raw ``dd`` in the
  guest) shows up as an extra range where the model knows every bit;
* a write in flight while a bitmap changes is refused rather than guessed;
* a guest that never prints its ready marker, or whose kernel panics, fails with the
  console's tail;
* a guest migrates to another VM and writes on there (the hand-over migration cases use);
* KVM that passes the cheap probe but cannot boot the guest: TCG, decided and said once.
"""

from __future__ import annotations

import gzip
import hashlib
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness import guest as guest_mod
from harness import guest_image
from harness.actions import migration_caps, wait_migration
from harness.block import blockdev, qcow2_node
from harness.errors import ConfigError, GuestError, OracleFailure, UnmodelledCommand
from harness.guest_image import (
    Cpio,
    GuestBuildError,
    GuestFiles,
    Package,
    choose_packages,
    modinfo,
    parse_apt_show,
    resolve_modules,
)
from harness.session import Case, Environment, own_guest
from harness.vm import VM

# -- building, without network ----------------------------------------------------------


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive, checking the format as the kernel reads it."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out[name] = (mode, body)


def test_cpio_newc_has_dirs_files_links_and_trailer() -> None:
    c = Cpio()
    c.file("bin/busybox", b"\x7fELF...", 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", b"#!/bin/sh\n", 0o755)
    entries = read_cpio(c.finish())
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "init"]
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF...")
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")


def elf_module(info: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable with a ``.modinfo`` section, as a kernel module has."""
    modinfo_data = b"".join(f"{k}={v}\0".encode() for k, v in info.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo_data)
    shoff = shstr_off + len(shstr)
    shoff += -shoff % 8
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = header + modinfo_data + shstr
    body += bytes(shoff - len(body))
    null = bytes(64)
    sec_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, data_off, len(modinfo_data),
                              0, 0, 1, 0)
    sec_shstr = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    return body + null + sec_modinfo + sec_shstr


def test_modinfo_reads_depends() -> None:
    assert modinfo(elf_module({"depends": "virtio,virtio_ring", "name": "virtio_blk"})) == {
        "depends": "virtio,virtio_ring", "name": "virtio_blk"}
    with pytest.raises(GuestBuildError, match="64-bit ELF"):
        modinfo(b"not an elf file at all")


def make_moddir(root: Path, modules: dict[str, str], builtin: Sequence[str] = (),
                compress: tuple[str, ...] = ()) -> Path:
    moddir = root / "lib/modules/6.1.0-test"
    for name, deps in modules.items():
        path = moddir / "kernel/drivers" / f"{name.replace('_', '-')}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = elf_module({"depends": deps, "name": name})
        if name in compress:
            path = path.with_name(path.name + ".gz")
            data = gzip.compress(data)
        path.write_bytes(data)
    (moddir / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    return moddir


def test_modules_in_load_order_builtins_left_out(tmp_path: Path) -> None:
    moddir = make_moddir(tmp_path, {
        "virtio_blk": "virtio,virtio_ring", "virtio_pci": "virtio,virtio_ring,virtio_pci_x",
        "virtio": "", "virtio_ring": "", "virtio_pci_x": "virtio"},
        builtin=["drivers/virtio_ring"], compress=("virtio_pci_x",))
    order = [n for n, _ in resolve_modules(moddir, ["virtio_pci", "virtio_blk"])]
    assert order == ["virtio", "virtio_pci_x", "virtio_pci", "virtio_blk"]
    assert all(data.startswith(b"\x7fELF") for _, data in resolve_modules(moddir, ["virtio_pci"]))


def test_a_missing_module_is_named_with_who_needs_it(tmp_path: Path) -> None:
    moddir = make_moddir(tmp_path, {"virtio_blk": "virtio"})
    with pytest.raises(GuestBuildError, match=r"no module virtio .*virtio_blk"):
        resolve_modules(moddir, ["virtio_blk"])


APT_SHOW = """Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
Description: Linux for x86-64 cloud (meta-package)

Package: linux-image-cloud-amd64
Version: 6.1.176-1
"""


def test_parse_apt_show_takes_the_candidate_stanza() -> None:
    assert parse_apt_show(APT_SHOW) == Package(
        "linux-image-cloud-amd64", "6.1.192-3", ("linux-image-6.1.0-57-cloud-amd64",))
    assert parse_apt_show("") is None


def fake_apt(packages: dict[str, tuple[str, tuple[str, ...]]]) -> guest_image.Show:
    packages = {"busybox-static": ("1:1.35.0-4", ()), **packages}

    def show(names: Sequence[str]) -> dict[str, Package]:
        return {n: Package(n, *packages[n]) for n in names if n in packages}
    return show


def test_debian_cloud_kernel_through_its_metapackage() -> None:
    show = fake_apt({
        "linux-image-cloud-amd64": ("6.1.192-3", ("linux-image-6.1.0-57-cloud-amd64",)),
        "linux-image-6.1.0-57-cloud-amd64": ("6.1.192-3", ("kmod", "linux-base")),
        "linux-image-amd64": ("6.1.192-3", ("linux-image-6.1.0-57-amd64",)),
    })
    assert [p.name for p in choose_packages(show)] == ["linux-image-6.1.0-57-cloud-amd64",
                                                       "busybox-static"]


def test_ubuntu_kvm_kernel_with_its_modules_package() -> None:
    show = fake_apt({
        "linux-image-kvm": ("6.8.0.1015.15", ("linux-image-6.8.0-1015-kvm",)),
        "linux-image-6.8.0-1015-kvm": ("6.8.0-1015.16", (
            "linux-modules-6.8.0-1015-kvm", "linux-modules-extra-6.8.0-1015-kvm")),
        "linux-modules-6.8.0-1015-kvm": ("6.8.0-1015.16", ()),
        "linux-image-virtual": ("6.8.0-45.45", ("linux-image-generic",)),
    })
    assert [p.name for p in choose_packages(show)] == [
        "linux-image-6.8.0-1015-kvm", "linux-modules-6.8.0-1015-kvm", "busybox-static"]


def test_no_kernel_package_is_one_sentence() -> None:
    with pytest.raises(GuestBuildError, match=r"apt offers none of the kernel packages .*"
                       r"apt-get update.*--guest-kernel"):
        choose_packages(fake_apt({}))


def test_own_guest_options(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    assert own_guest(None, None) is None
    files = own_guest(str(tmp_path / "k"), str(tmp_path / "i"))
    assert files is not None and files.kernel == tmp_path / "k"
    with pytest.raises(ConfigError, match=r"--guest-kernel needs --guest-initrd too"):
        own_guest(str(tmp_path / "k"), None)
    with pytest.raises(ConfigError, match=r"--guest-initrd .*/nope: no such file"):
        own_guest(str(tmp_path / "k"), str(tmp_path / "nope"))


# -- a real guest (TCG) -----------------------------------------------------------------


def booted(case: Case) -> VM:
    case.img.create("disk.qcow2", 4 << 20)
    vm = case.vm(args=[*blockdev(qcow2_node(case.path("disk.qcow2"), "disk")),
                       "-device", "virtio-blk-pci,drive=disk,id=disk0"], guest=True)
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="disk", name="b")
    return vm


@pytest.mark.guest
def test_guest_writes_the_oracle_checks_can_fail(lenient_case: Case) -> None:
    vm = booted(lenient_case)
    vm.guest.write(0, 0x10000, 0x11)
    lenient_case.check_live(vm, "disk")

    # the bitmap stops recording behind the oracle's back: the next guest write is missing
    vm.execute("block-dirty-bitmap-disable", {"node": "disk", "name": "b"})
    vm.guest.write(0x200000, 0x1000, 0x22)
    with pytest.raises(OracleFailure, match=r"missing \[0x200000\+0x10000\]"):
        lenient_case.check_live(vm, "disk")
    vm.execute("block-dirty-bitmap-enable", {"node": "disk", "name": "b"})
    vm.execute("block-dirty-bitmap-clear", {"node": "disk", "name": "b"})
    lenient_case.oracle.model(vm).clear("disk", "b")

    # a write the oracle is not told about: where the model knows every bit, it is extra
    vm.guest.run("head -c 4096 /dev/zero | dd of=/dev/vda bs=4096 seek=256 oflag=direct")
    with pytest.raises(OracleFailure, match=r"extra \[0x100000\+0x10000\]"):
        lenient_case.oracle.check_exact(vm, "disk", ["b"], "after a hidden write")

    # a write in flight while the bitmap is cleared could land before or after: refused
    racing = vm.guest.start_write(0x300000, 0x1000, 0x33)
    vm.qmp("block-dirty-bitmap-clear", node="disk", name="b")
    with pytest.raises(UnmodelledCommand, match=r"in flight while block-dirty-bitmap-clear"):
        racing.wait()


def broken_initrd(tmp_path: Path, init: str) -> Path:
    """An initrd with the real guest's busybox and another /init."""
    files = guest_image.ensure(lambda _line: None)
    entries = read_cpio(gzip.decompress(files.initrd.read_bytes()))
    c = Cpio()
    c.file("bin/busybox", entries["bin/busybox"][1], 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", init.encode(), 0o755)
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(c.finish()))
    return path


@pytest.mark.guest
@pytest.mark.parametrize("init,expect", [
    ("#!/bin/sh\necho init-without-marker\nexec /bin/busybox sleep 1000\n",
     r"did not reach its ready marker 'QIO-GUEST-READY' \(boot\) within 30 s(.|\n)*"
     r"console .*last lines:(.|\n)*init-without-marker"),
    ("#!/bin/sh\nexit 1\n", r"kernel panicked(.|\n)*Attempted to kill init"),
], ids=["no-marker", "panic"])
def test_a_guest_that_never_gets_ready_fails_with_the_console(
        env: Environment, tmp_path: Path, init: str, expect: str) -> None:
    files = guest_image.ensure(lambda _line: None)
    own = GuestFiles(files.kernel, broken_initrd(tmp_path, init), "broken initrd")
    case = Case(Environment(env.binaries, env.probe, "tcg", "tcg", "tcg", own), tmp_path)
    try:
        vm = case.vm(guest=True)
        vm.guest.boot_timeout = 30.0
        with pytest.raises(GuestError, match=expect):
            vm.launch()
        assert vm.state == "stopped", "a guest that failed to boot left its QEMU running"
    finally:
        case.close(failed=True)


@pytest.mark.guest
def test_a_guest_migrates_and_writes_on(lenient_case: Case) -> None:
    """The hand-over a migration case builds on: the destination boots nothing, takes
    the source's guest with continues_from(), and its writes land in the model there."""
    lenient_case.img.create("disk.qcow2", 4 << 20)
    disk = [*blockdev(qcow2_node(lenient_case.path("disk.qcow2"), "disk")),
            "-device", "virtio-blk-pci,drive=disk,id=disk0"]
    sock = lenient_case.sockdir / "mig.sock"
    src = lenient_case.vm("src", args=disk, guest=True)
    dst = lenient_case.vm("dst", args=[*disk, "-incoming", f"unix:{sock}"], guest=True)
    src.launch()
    dst.launch()
    src.qmp("block-dirty-bitmap-add", node="disk", name="b")
    src.guest.write(0, 0x10000, 0x11)
    for vm in (src, dst):
        migration_caps(vm, events=True, dirty_bitmaps=True)
    src.qmp("migrate", uri=f"unix:{sock}")
    assert wait_migration(src) == "completed"
    assert wait_migration(dst) == "completed"
    dst.guest.continues_from(src.guest)
    dst.guest.write(0x200000, 0x1000, 0x22)
    (v,) = lenient_case.check_live(dst, "disk")
    assert list(v.required) == [(0, 0x10000), (0x200000, 0x10000)]
    assert dst.guest.checksum(0, 0x10000, show=False) == hashlib.sha256(
        b"\x11" * 0x10000).hexdigest()
    src.shutdown()  # paused after the migration: no poweroff, no wait for one
    dst.shutdown()  # the guest powers off here


def test_kvm_that_cannot_boot_the_guest_falls_back_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def probe_boot(qemu: str, accel: str, files: GuestFiles, workdir: Path,
                   timeout: float) -> tuple[float | None, str]:
        calls.append(accel)
        return None, "the guest printed nothing"

    monkeypatch.setattr(guest_mod, "probe_boot", probe_boot)
    said: list[str] = []
    files = GuestFiles(tmp_path / "k", tmp_path / "i", "test")
    assert guest_mod.choose_accel("tcg", "auto", "qemu", files, tmp_path, said.append) == \
        guest_mod.GuestAccel("tcg", "tcg (the session's)")
    assert guest_mod.choose_accel("kvm", "kvm", "qemu", files, tmp_path, said.append).accel \
        == "kvm"  # asked for: no probe
    for _process in range(2):  # two xdist workers share the directory
        guest_mod._DECIDED.clear()
        got = guest_mod.choose_accel("kvm", "auto", "qemu", files, tmp_path / "s", said.append)
        assert got.accel == "tcg" and "cannot run the guest: the guest printed nothing" in got.note
    assert calls == ["kvm"]
    assert said == [f"guest accel: {got.note}"]
