"""Live migration as the oracle follows it: which bitmaps travel, under what names, how.

Pure rules, no QEMU: the oracle (harness/oracle.py) calls them when a ``migrate`` it
follows switches over and when the destination takes over. What they encode is QEMU's
bitmap migration (``migration/block-dirty-bitmap.c``, the ``dirty-bitmaps`` capability):

* every named bitmap of every named node travels (not those of nodes with generated
  ``#...`` names: QEMU refuses to start such a migration), under the node's name, or the
  drive id of a named BlockBackend (``-drive id=``) on it; a ``block-bitmap-mapping``
  migration parameter, when set, names the node and bitmap *aliases* sent on the wire,
  and a node or bitmap it does not list stays home;
* the destination creates each bitmap on the node its own mapping (or the same name) gives,
  with the source's granularity, contents and enabled state; it is persistent when the
  source's was, unless a ``transform`` of either side's mapping says otherwise;
* the source keeps its bitmaps in RAM and, for the ones that travel, skips storing them
  when its images are inactivated (so with shared storage the image still holds the old,
  in-use copy, which the destination then ignores in favour of the migrated one). Without
  the capability, the persistent bitmaps are stored at inactivation and released, and a
  destination on the same storage loads them from the image.

A migration is followed from ``migrate`` (source) to its end: the source's switchover
(``completed``, or ``postcopy-active``) takes the snapshot of what is sent; the
destination's start (``RESUME``, or its own ``completed``) is where the bitmaps appear.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from harness.model import ModelBitmap

#: the MIGRATION statuses after which the source's disks are inactive (it switched over)
SWITCHED = frozenset({"completed", "postcopy-active", "postcopy-paused",
                      "postcopy-recover"})
#: the statuses a migration ends in without a destination taking over
FAILED = frozenset({"failed", "cancelled"})


@dataclass(frozen=True)
class Sent:
    """One bitmap on the wire: the node and bitmap alias, its state, and its persistence
    as the source sends it (after the source's ``transform``)."""

    node: str
    name: str
    bitmap: ModelBitmap
    persistent: bool


@dataclass
class Migration:
    """One ``migrate`` the oracle follows, from the source ``source`` to VM ``dest`` (None:
    a destination that is no VM of the case, such as a file)."""

    source: str
    dest: str | None
    uri: str
    bitmaps: bool  # the source's dirty-bitmaps capability
    mapping: list[dict[str, Any]] | None = None  # the source's block-bitmap-mapping
    status: str = "setup"
    sent: list[Sent] | None = None  # taken at switchover
    switched: bool = False  # the source inactivated its disks
    arrived: bool = False  # the destination took over (bitmaps created there)
    done: set[str] = field(default_factory=set)  # "source", "dest": seen their end
    landed: list[tuple[str, str]] = field(default_factory=list)  # (node, bitmap) on dest
    file: str | None = None  # the file a migration to one wrote (see file_of)

    @property
    def in_flight(self) -> bool:
        return self.status not in FAILED and "source" not in self.done


def uri_of(args: Mapping[str, Any]) -> str | None:
    """The address of ``migrate``/``migrate-incoming`` as ``unix:PATH`` (``uri`` or a
    10.x ``channels`` list with one main unix socket); None for anything else."""
    uri = args.get("uri")
    if isinstance(uri, str):
        return uri
    for channel in args.get("channels", []) or []:
        addr = channel.get("addr", {}) if isinstance(channel, dict) else {}
        if (channel.get("channel-type", "main") == "main"
                and addr.get("transport") == "socket" and addr.get("type") == "unix"):
            return f"unix:{addr.get('path')}"
    return None


def file_of(uri: str | None, writes: bool) -> str | None:
    """The file a migration through one writes (``exec:cat > PATH``, ``writes``) or reads
    (``exec:cat PATH``); None for any other address. A destination reading the file takes
    over the migration that wrote it (or a copy the case edited, see
    :meth:`harness.oracle.Oracle.stream_edited`)."""
    prefix = "exec:cat > " if writes else "exec:cat "
    if uri is None or not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].strip()
    return None if not path or path.startswith((">", "<", "|")) else path


def _node_map(mapping: Iterable[dict[str, Any]] | None,
              outgoing: bool) -> dict[str, tuple[str, dict[str, dict[str, Any]]]] | None:
    """node -> (alias, {bitmap: entry}) sending, alias -> (node, {alias: entry}) receiving."""
    if mapping is None:
        return None
    out: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {}
    for entry in mapping:
        key, value = (("node-name", "alias") if outgoing else ("alias", "node-name"))
        bitmaps = {str(b["name" if outgoing else "alias"]): dict(b)
                   for b in entry.get("bitmaps", [])}
        out[str(entry[key])] = (str(entry[value]), bitmaps)
    return out


def _transform(entry: Mapping[str, Any]) -> bool | None:
    t = entry.get("transform")
    if isinstance(t, Mapping) and "persistent" in t:
        return bool(t["persistent"])
    return None


def to_send(nodes: Mapping[str, Mapping[str, ModelBitmap]],
            mapping: list[dict[str, Any]] | None,
            backends: Mapping[str, str] | None = None) -> list[Sent]:
    """What the source puts on the wire from its nodes' bitmaps (``{node: {name:
    bitmap}}``, successors of running backups left out by the caller). ``backends``:
    ``{node: drive id}`` for the node a named BlockBackend (``-drive id=...``) stands on,
    filters skipped: without a mapping its bitmaps travel under the drive id."""
    aliases = _node_map(mapping, outgoing=True)
    backends = backends or {}
    sent = []
    for node, bitmaps in sorted(nodes.items()):
        if not bitmaps or node.startswith("#"):
            continue
        if aliases is None:
            node_alias, names = backends.get(node, node), None
        elif node in aliases:
            node_alias, names = aliases[node]
        else:
            continue
        for name, b in sorted(bitmaps.items()):
            persistent = b.persistent
            alias = name
            if names is not None:
                if name not in names:
                    continue
                alias = str(names[name]["alias"])
                t = _transform(names[name])
                if t is not None:
                    persistent = t
            sent.append(Sent(node_alias, alias, b.copy(), persistent))
    return sent


def received(sent: Iterable[Sent], mapping: list[dict[str, Any]] | None,
             drives: Mapping[str, str] | None = None) -> list[tuple[str, ModelBitmap]]:
    """Where each sent bitmap lands on the destination (its own ``block-bitmap-mapping``
    read the other way): ``(node, bitmap as the destination has it)``. An alias the
    destination's mapping does not know makes QEMU fail the incoming migration; such a
    bitmap comes back with node ``""`` for the caller to report. Without a mapping, a
    node alias is looked up as a drive id first (``drives``: ``{drive id: its root
    node}``, filters not skipped), then as a node name."""
    aliases = _node_map(mapping, outgoing=False)
    drives = drives or {}
    out = []
    for s in sent:
        node, name, persistent = drives.get(s.node, s.node), s.name, s.persistent
        if aliases is not None:
            if s.node not in aliases or s.name not in aliases[s.node][1]:
                out.append(("", replace(s.bitmap, name=s.name)))
                continue
            node, names = aliases[s.node]
            name = str(names[s.name]["name"])
            t = _transform(names[s.name])
            if t is not None:
                persistent = t
        out.append((node, replace(s.bitmap.copy(), name=name, persistent=persistent,
                                  varies=None)))
    return out
