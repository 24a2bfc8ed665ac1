"""The paper's tables and precision-recall plot for one ``generate`` run.

The KVSmooth paper reports, per model:

- Table 1: CHAIR_S and F1 of the baseline, KVSmooth without the adaptive λ (``fixed``) and
  KVSmooth (``adaptive``);
- Table 2: OPOPE accuracy, precision and F_β (β = 0.2), each the mean over the random,
  popular and adversarial splits;
- Table 4: CHAIR_S and F1 when only the keys are smoothed (``keys``, "Key (K_t)") and when
  keys and values are (``adaptive``, "Key-Value (K_t, V_t)"); its third row, smoothing the
  attention output o_t, is not a mode of this implementation.

:func:`markdown_report` writes these for the settings of a run, each table headed by the
protocol its numbers follow (``opera`` / ``halc`` reproduce the paper's; ``extended`` does
not), then every CHAIR number of every setting; :func:`plot_precision_recall` draws
Figure 4's precision against recall, one line per KVSmooth mode across its λ values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .chair import ChairResult, GroundTruth, compute_chair, make_extractor
from .coco import CocoAnnotations, EvalError, PathLike, read_caption_records
from .generate import Setting, load_manifest, settings_in
from .opope import DEFAULT_BETA, average, evaluate_opope

_MODE_ORDER = {None: 0, "adaptive": 1, "fixed": 2, "keys": 3}

PROTOCOL_NOTES = {
    "opera": "protocol `opera`: OPERA `chair.py` objects (NLTK), precision and F1 over "
    "distinct objects as PAI / MiddleLayer: the paper's",
    "extended": "protocol `extended`: this project's synonym table without NLTK, precision "
    "and F1 over distinct objects; not comparable with the paper's numbers",
    "halc": "protocol `halc`: HALC `opope_eval.py` answer rule and probes: the paper's",
    "halc-questions": "protocol `halc`: HALC's answer rule on POPE's question files",
    "extended-opope": "protocol `extended`: answers from the extended CHAIR extractor, "
    "probes drawn per image; not comparable with the paper's numbers",
}


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    chair_protocol: str = "opera"
    opope_protocol: str | None = None  # None: no OPOPE table
    nltk_data: PathLike | None = None
    questions: tuple[PathLike, ...] | None = None  # POPE's files, for halc
    opope_seed: int = 0

    def opope_note(self) -> str:
        if self.opope_protocol == "extended":
            return PROTOCOL_NOTES["extended-opope"]
        return PROTOCOL_NOTES["halc-questions" if self.questions else "halc"]


@dataclasses.dataclass(frozen=True)
class Row:
    setting: Setting
    chair: ChairResult
    n_expected: int  # images of the run; chair.n_captions is how many were captioned
    opope: dict[str, float] | None = None  # OPOPE means over the three sets, percent


def _sort_key(setting: Setting) -> tuple[int, float]:
    return (_MODE_ORDER[setting.mode], setting.lambda_ref or 0.0)


def evaluate_run(
    run_dir: PathLike,
    annotations: CocoAnnotations,
    options: ReportOptions = ReportOptions(),
) -> list[Row]:
    """CHAIR (and OPOPE) of every setting of a run that has captions so far."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    n_expected = len(manifest["images"]["ids"])
    truth = GroundTruth(annotations, make_extractor(options.chair_protocol, options.nltk_data))
    rows = []
    for setting in sorted(settings_in(manifest), key=_sort_key):
        path = run_dir / f"{setting.name}.jsonl"
        if not path.exists():
            continue
        records = read_caption_records(path)
        if not records:
            continue
        opope = None
        if options.opope_protocol == "halc":
            from .halc import evaluate_halc

            opope = average(
                evaluate_halc(records, annotations, questions=options.questions,
                              seed=options.opope_seed)
            )
        elif options.opope_protocol == "extended":
            opope = average(evaluate_opope(records, annotations, seed=options.opope_seed))
        elif options.opope_protocol is not None:
            raise EvalError(f"unknown OPOPE protocol {options.opope_protocol!r}")
        rows.append(Row(setting, compute_chair(records, truth), n_expected, opope))
    if not rows:
        raise EvalError(f"{run_dir}: no captions yet")
    return rows


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def _table4_label(setting: Setting) -> str:
    what = "Key (K_t)" if setting.mode == "keys" else "Key-Value (K_t, V_t)"
    return f"{what}, λref = {setting.lambda_ref:g}"


def markdown_report(
    rows: Sequence[Row],
    manifest: dict[str, Any] | None = None,
    options: ReportOptions = ReportOptions(),
) -> str:
    chair_note = PROTOCOL_NOTES[options.chair_protocol]
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
    protocols = f"CHAIR: {chair_note}."
    if options.opope_protocol is not None:
        protocols += f" OPOPE: {options.opope_note()}."
    lines += [f"Protocols. {protocols}", ""]

    main_rows = [r for r in rows if r.setting.mode != "keys"]
    lines += [
        f"Table 1. CHAIR ({chair_note}).",
        "",
        "| Method | CHAIR_S ↓ | F1 ↑ |",
        "| --- | ---: | ---: |",
    ]
    for r in main_rows:
        lines.append(f"| {r.setting.label} | {_pct(r.chair.chair_s)} | {_pct(r.chair.f1)} |")

    if any(r.opope is not None for r in rows):
        lines += [
            "",
            f"Table 2. OPOPE ({options.opope_note()}), mean over random / popular / "
            f"adversarial, β = {DEFAULT_BETA}.",
            "",
            "| Method | Acc ↑ | Pre ↑ | F_β ↑ |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in main_rows:
            if r.opope is not None:
                o = r.opope
                lines.append(
                    f"| {r.setting.label} | {o['accuracy']:.2f} | {o['precision']:.2f} | "
                    f"{o['F_beta']:.2f} |"
                )

    smoothing = [r for r in rows if r.setting.mode in ("keys", "adaptive")]
    if any(r.setting.mode == "keys" for r in rows):
        lines += [
            "",
            f"Table 4. Smoothed states, CHAIR ({chair_note}); the attention-output (o_t) "
            "row of the paper is not a mode of this implementation.",
            "",
            "| Method | C_S ↓ | F1 ↑ |",
            "| --- | ---: | ---: |",
        ]
        for r in sorted(smoothing, key=lambda r: (r.setting.mode != "keys", _sort_key(r.setting))):
            lines.append(
                f"| {_table4_label(r.setting)} | {_pct(r.chair.chair_s)} | {_pct(r.chair.f1)} |"
            )

    lines += [
        "",
        f"All CHAIR numbers ({chair_note}).",
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
