"""The paper's tables and precision-recall plot for one ``generate`` run.

Table 1 of the paper lists CHAIR_S and F1 per method; Figure 4 plots CHAIR precision
against recall while λref is swept. :func:`markdown_report` writes the same table for the
settings of a run (plus the other CHAIR numbers, and OPOPE as in Table 2 if asked), and
:func:`plot_precision_recall` the plot, one line per KVSmooth mode across its λ values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .chair import ChairResult, compute_chair
from .coco import CocoAnnotations, EvalError, PathLike, read_caption_records
from .generate import Setting, load_manifest, settings_in
from .opope import DEFAULT_BETA, average, evaluate_opope

_MODE_ORDER = {None: 0, "adaptive": 1, "fixed": 2, "keys": 3}


@dataclasses.dataclass(frozen=True)
class Row:
    setting: Setting
    chair: ChairResult
    n_expected: int  # images of the run; chair.n_captions is how many were captioned
    opope: dict[str, float] | None = None  # OPOPE means over the three sets, percent


def _sort_key(setting: Setting) -> tuple:
    return (_MODE_ORDER[setting.mode], setting.lambda_ref or 0.0)


def evaluate_run(
    run_dir: PathLike,
    annotations: CocoAnnotations,
    with_opope: bool = False,
    opope_seed: int = 0,
) -> list[Row]:
    """CHAIR (and OPOPE) of every setting of a run that has captions so far."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    n_expected = len(manifest["images"]["ids"])
    rows = []
    for setting in sorted(settings_in(manifest), key=_sort_key):
        path = run_dir / f"{setting.name}.jsonl"
        if not path.exists():
            continue
        records = read_caption_records(path)
        if not records:
            continue
        opope = None
        if with_opope:
            opope = average(evaluate_opope(records, annotations, seed=opope_seed))
        rows.append(Row(setting, compute_chair(records, annotations), n_expected, opope))
    if not rows:
        raise EvalError(f"{run_dir}: no captions yet")
    return rows


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def markdown_report(rows: Sequence[Row], manifest: dict[str, Any] | None = None) -> str:
    lines: list[str] = []
    if manifest is not None:
        model = manifest["model"]
        images = manifest["images"]
        lines += [
            f"Model `{model['file']}` (sha256 `{model['sha256'][:12]}…`), "
            f"mmproj `{manifest['mmproj']['file']}`; {images['n']} COCO images "
            f"(seed {images['seed']}), greedy, at most "
            f"{manifest['generation']['max_tokens']} new tokens.",
            "",
        ]
    lines += [
        "| Method | CHAIR_S ↓ | F1 ↑ |",
        "| --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.setting.label} | {_pct(r.chair.chair_s)} | {_pct(r.chair.f1)} |")
    lines += [
        "",
        "| Method | CHAIR_S | CHAIR_I | Precision | Recall | F1 | Captions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        c = r.chair
        lines.append(
            f"| {r.setting.label} | {_pct(c.chair_s)} | {_pct(c.chair_i)} | "
            f"{_pct(c.precision)} | {_pct(c.recall)} | {_pct(c.f1)} | "
            f"{c.n_captions}/{r.n_expected} |"
        )
    if any(r.opope is not None for r in rows):
        lines += [
            "",
            f"OPOPE, mean over random / popular / adversarial (β = {DEFAULT_BETA}):",
            "",
            "| Method | Acc ↑ | Pre ↑ | F_β ↑ |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in rows:
            if r.opope is not None:
                o = r.opope
                lines.append(
                    f"| {r.setting.label} | {o['accuracy']:.2f} | {o['precision']:.2f} | "
                    f"{o['F_beta']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def plot_precision_recall(rows: Sequence[Row], path: PathLike, title: str = "") -> None:
    """CHAIR precision against recall (percent); one line per KVSmooth mode over λ."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError(
            "the precision-recall plot needs matplotlib: pip install 'pykvsmooth[plot]'"
        ) from None

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for mode, marker in (("adaptive", "o"), ("fixed", "s"), ("keys", "^")):
        series = sorted(
            (r for r in rows if r.setting.mode == mode), key=lambda r: _sort_key(r.setting)
        )
        if not series:
            continue
        xs = [100.0 * r.chair.recall for r in series]
        ys = [100.0 * r.chair.precision for r in series]
        name = {"adaptive": "KVSmooth", "fixed": "KVSmooth w/o Ada.", "keys": "keys only"}[mode]
        ax.plot(xs, ys, marker=marker, label=name)
        for r, x, y in zip(series, xs, ys):
            ax.annotate(f"{r.setting.lambda_ref:g}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    for r in rows:
        if r.setting.mode is None:
            ax.plot([100.0 * r.chair.recall], [100.0 * r.chair.precision], marker="*",
                    markersize=12, linestyle="none", color="black", label="Baseline")
    ax.set_xlabel("Recall (%)")
    ax.set_ylabel("Precision (%)")
    ax.set_title(title or "CHAIR precision-recall across λ")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=150)
    plt.close(fig)
