from harness.session import Case


def test_launch(qio: Case) -> None:
    vm = qio.vm()
    vm.launch()
    qio.img.create("a.qcow2", "64M")
    vm.qmp_log("blockdev-add", driver="qcow2", **{"node-name": "drive0"},
               file={"driver": "file", "filename": str(qio.path("a.qcow2"))})
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="bitmap0", persistent=True)
    vm.qemu_io("drive0", "write -P 0x11 0 64k", log=True)
    r = vm.qmp("query-named-block-nodes")
    assert r[0]["dirty-bitmaps"][0]["count"] == 65536
