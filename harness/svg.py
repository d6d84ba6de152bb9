"""Draw an oracle failure as SVG: one strip per bitmap over the whole disk.

The failure text says ``missing [0x7f0000+0x10000]``; on a 64 MiB disk with a dozen dirty
ranges a picture shows at a glance where QEMU's bitmap has its hole and whether it sits
next to a commit boundary or a snapshot's first write. Each bitmap gets three rows on one
scale (the node's size): what the model requires, what QEMU had (ranges the model did not
require in orange), and the missing ranges in red, each labelled with its offset and
length. Pure: verdicts in, text out; the plugin decides where the file goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from harness.model import Range, Verdict

LEFT = 130  #: width of the label column (px)
WIDTH = 720  #: width of the disk strip (px)
ROW = 16  #: height of one row (px)
MIN_W = 2.0  #: narrowest rectangle drawn, so a 512-byte range on a large disk still shows
MAX_LABELS = 8  #: offset labels under the missing row; more are only in the tooltips
LABEL_ROWS = 3  #: rows the offset labels may use to stay apart
CHAR_W = 6.7  #: width of one character of the 11 px monospace labels (px)
RIGHT_PAD = 60  #: room right of the strip, for the last label

COLORS = {
    "required": "#4c78a8",
    "actual": "#54a24b",
    "extra": "#f58518",
    "missing": "#d62728",
}


def scale_of(v: Verdict) -> int:
    """The strip's length in bytes: the node size, else the end of the last range."""
    if v.size > 0:
        return v.size
    ends = [off + n for ext in (v.required, v.actual) for off, n in ext]
    return max(ends, default=0) or 1


def x_of(offset: int, size: int) -> float:
    """Where ``offset`` lands on a strip of ``size`` bytes (px from the image's left)."""
    return LEFT + offset * WIDTH / size


def _rects(kind: str, ranges: Iterable[Range], size: int, y: float) -> list[str]:
    out = []
    for off, n in ranges:
        x = x_of(off, size)
        w = max(n * WIDTH / size, MIN_W)
        out.append(
            f'<rect class="{kind}" x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{ROW}" '
            f'fill="{COLORS[kind]}" data-offset="{off:#x}" data-length="{n:#x}">'
            f"<title>{kind} {off:#x}+{n:#x}</title></rect>")
    return out


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.2f}" y="{y:.2f}" text-anchor="{anchor}"{extra}>'
            f"{escape(text)}</text>")


def _block(v: Verdict, top: float) -> tuple[list[str], float]:
    """The drawing of one verdict from ``top`` down; returns its elements and height."""
    size = scale_of(v)
    els = []
    if v.inconsistent:
        state = "flagged inconsistent by QEMU (not checked further)"
    elif v.missing:
        state = f"INCOMPLETE: misses {v.missing.total():#x} bytes"
    else:
        state = "complete"
    els.append(_text(4, top + 12, f"{v.node}/{v.bitmap}: {state}", extra=' font-weight="bold"'))
    y = top + 20
    rows: list[tuple[str, list[str]]] = [
        ("model requires", _rects("required", v.required, size, y)),
        ("QEMU has", _rects("actual", v.actual.minus(v.extra), size, y + ROW + 4)
         + _rects("extra", v.extra, size, y + ROW + 4)),
        ("missing", _rects("missing", v.missing, size, y + 2 * (ROW + 4))),
    ]
    for i, (label, rects) in enumerate(rows):
        ry = y + i * (ROW + 4)
        els.append(_text(LEFT - 6, ry + 12, label, "end"))
        els.append(f'<rect class="lane" x="{LEFT}" y="{ry:.2f}" width="{WIDTH}" '
                   f'height="{ROW}" fill="#f2f2f2" stroke="#999" stroke-width="0.5"/>')
        els.extend(rects)
    axis = y + 3 * (ROW + 4) + 10
    els.append(_text(LEFT, axis, "0x0", extra=' class="tick"'))
    els.append(_text(LEFT + WIDTH, axis, f"{size:#x}", "end", ' class="tick"'))
    labels, rows_used = _offset_labels(v, size, axis + 14)
    els.extend(labels)
    bottom = axis + 14 * rows_used + 6
    if len(v.missing) > MAX_LABELS:
        els.append(_text(LEFT, bottom + 8, f"... and {len(v.missing) - MAX_LABELS} more "
                         "missing ranges (in the tooltips and the report text)"))
        bottom += 14
    return els, bottom - top


def _offset_labels(v: Verdict, size: int, y: float) -> tuple[list[str], int]:
    """``offset+length`` under each missing range, on up to LABEL_ROWS staggered rows so
    neighbours do not overlap, kept inside the image; returns the labels and rows used."""
    row_end: list[float] = []
    out = []
    right = LEFT + WIDTH + RIGHT_PAD
    for off, n in list(v.missing)[:MAX_LABELS]:
        text = f"{off:#x}+{n:#x}"
        width = CHAR_W * len(text)
        x = max(4.0, min(x_of(off, size), right - width))
        row = next((i for i, end in enumerate(row_end) if x > end + 8), len(row_end))
        if row >= LABEL_ROWS:
            continue  # still in the rectangle's tooltip and in the report text
        if row == len(row_end):
            row_end.append(0.0)
        row_end[row] = x + width
        out.append(_text(x, y + 14 * row, text,
                         extra=f' class="offset" fill="{COLORS["missing"]}"'))
    return out, len(row_end)


def render(verdicts: Sequence[Verdict], title: str = "") -> str:
    """An SVG document with one strip per verdict, failing ones first."""
    ordered = sorted(verdicts, key=lambda v: v.ok)
    body: list[str] = []
    y = 8.0
    if title:
        body.append(_text(4, y + 12, title, extra=' font-weight="bold" font-size="13"'))
        y += 22
    legend_x = LEFT
    for kind, label in (("required", "model requires"), ("actual", "QEMU has"),
                        ("extra", "QEMU has, not required"), ("missing", "missing")):
        body.append(f'<rect x="{legend_x}" y="{y:.2f}" width="10" height="10" '
                    f'fill="{COLORS[kind]}"/>')
        body.append(_text(legend_x + 14, y + 9, label))
        legend_x += 30 + 7 * len(label)
    y += 18
    for v in ordered:
        els, height = _block(v, y)
        body.extend(els)
        y += height + 10
    width = LEFT + WIDTH + RIGHT_PAD
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y:.0f}" '
            f'viewBox="0 0 {width} {y:.0f}" font-family="monospace" font-size="11">\n'
            f"<title>{escape(title or 'oracle verdicts')}</title>\n"
            f'<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def write(path: Path, verdicts: Sequence[Verdict], title: str = "") -> Path:
    """Write :func:`render` to ``path``; returns it."""
    path.write_text(render(verdicts, title), encoding="utf-8")
    return path

