#!/usr/bin/env python3
"""Draw a KVSmooth trace as a "sink map".

    python scripts/plot_trace.py TRACE.jsonl -o sinkmap.png [--seq 0] [--title TEXT]

TRACE.jsonl is what `llama-mtmd-cli --kvsmooth-trace` / `llama-llava-cli --kvsmooth-trace`
write: one JSON object per smoothed token and layer with at least "pos", "token", "layer",
"z" and "lambda" (and "seq_id"). The picture has the smoothed tokens along x (their text as
labels), the smoothed layers along y, colour = λ; above it, a line with the token's entropy
z averaged over the smoothed layers. Tokens whose entropy is high relative to their queue
get a large λ: those are the positions KVSmooth leans on the previous token most.

matplotlib is an optional dependency (`pip install pykvsmooth[plot]`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Record:
    seq_id: int
    pos: int
    token: str
    layer: int
    z: float
    lam: float


def read_trace(path: Path) -> list[Record]:
    """Parse a JSON-lines trace; raises ValueError naming the line on malformed input."""
    records: list[Record] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                z = obj.get("z")
                lam = obj.get("lambda")
                records.append(Record(
                    seq_id=int(obj.get("seq_id", 0)),
                    pos=int(obj["pos"]),
                    token=str(obj.get("token", "")),
                    layer=int(obj["layer"]),
                    z=math.nan if z is None else float(z),
                    lam=math.nan if lam is None else float(lam),
                ))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a trace record ({e})") from None
    return records


def _label(token: str) -> str:
    """Printable tick label: show spaces and newlines instead of losing them."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    if text.strip() == "":
        text = repr(token)
    return text if len(text) <= 12 else text[:11] + "…"


def plot(records: list[Record], out: Path, seq_id: int, title: str | None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plot_trace.py needs matplotlib: pip install 'pykvsmooth[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = [r for r in records if r.seq_id == seq_id]
    if not recs:
        raise SystemExit(f"error: the trace has no records for sequence {seq_id}")

    positions = sorted({r.pos for r in recs})
    layers = sorted({r.layer for r in recs})
    col = {p: i for i, p in enumerate(positions)}
    row = {layer: i for i, layer in enumerate(layers)}

    lam = np.full((len(layers), len(positions)), np.nan)
    z = np.full((len(layers), len(positions)), np.nan)
    tokens = [""] * len(positions)
    for r in recs:
        lam[row[r.layer], col[r.pos]] = r.lam
        z[row[r.layer], col[r.pos]] = r.z
        tokens[col[r.pos]] = r.token
    # a column has at least one record, but its z may be null (non-finite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        z_mean = np.nanmean(z, axis=0)

    width = min(max(6.0, 0.35 * len(positions) + 2.0), 40.0)
    height = min(max(4.0, 0.25 * len(layers) + 2.5), 20.0)
    fig, (ax_z, ax_map) = plt.subplots(
        2, 1, figsize=(width, height), sharex=True,
        gridspec_kw={"height_ratios": [1, 3]}, constrained_layout=True)

    x = np.arange(len(positions))
    ax_z.plot(x, z_mean, marker="o", markersize=3, linewidth=1)
    ax_z.set_ylabel("mean z")
    ax_z.grid(True, alpha=0.3)
    ax_z.set_title(title or f"KVSmooth trace: {len(positions)} tokens × {len(layers)} layers")

    im = ax_map.imshow(np.ma.masked_invalid(lam), aspect="auto", origin="lower",
                       cmap="viridis", interpolation="nearest",
                       extent=(-0.5, len(positions) - 0.5, -0.5, len(layers) - 0.5))
    ax_map.set_yticks(np.arange(len(layers)))
    ax_map.set_yticklabels([str(layer) for layer in layers])
    ax_map.set_ylabel("layer")
    ax_map.set_xticks(x)
    ax_map.set_xticklabels([_label(t) for t in tokens], rotation=90, fontsize=7)
    ax_map.set_xlabel("smoothed token (first: last prompt token)")
    fig.colorbar(im, ax=ax_map, label="λ")

    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw a KVSmooth trace (JSON lines) as a PNG sink map.")
    ap.add_argument("trace", type=Path, help="trace file written with --kvsmooth-trace")
    ap.add_argument("-o", "--output", type=Path, default=Path("sinkmap.png"),
                    help="output image (default: sinkmap.png)")
    ap.add_argument("--seq", type=int, default=0, help="sequence to draw (default: 0)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)

    try:
        records = read_trace(args.trace)
    except OSError as e:
        print(f"error: cannot read trace '{args.trace}': {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not records:
        print(f"error: trace '{args.trace}' is empty (was --kvsmooth given?)", file=sys.stderr)
        return 1
    plot(records, args.output, args.seq, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
