"""``python -m pykvsmooth.eval`` / ``kvsmooth-eval``: generate, chair, opope, amber, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .coco import EvalError, load_annotations, read_caption_records

CHAIR_PROTOCOLS = ("opera", "extended")
OPOPE_PROTOCOLS = ("halc", "extended")


# ------------------------------------------------------------------------- generate


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    """``generate``'s options (models, data, decoding, and the KVSmooth flags every tool has)."""
    from ..caption import add_kvsmooth_arguments
    from ..config import KVSmoothConfig
    from ..hub import add_hub_arguments

    g.add_argument("--model", "-m", help="language model GGUF (or -hf USER/MODEL[:QUANT])")
    g.add_argument("--mmproj", "-mm", help="vision projector (mmproj) GGUF (-hf finds it in the repository)")
    add_hub_arguments(g)
    g.add_argument("--images", required=True, help="COCO val2014 image folder")
    g.add_argument("--instances", required=True, help="instances_val2014.json")
    g.add_argument("--captions", help="captions_val2014.json (recorded for `report`)")
    g.add_argument("--out", required=True, help="output folder (run.json + one JSONL per setting)")
    g.add_argument("--n-images", type=int, default=500, help="images to sample (paper: 500)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument(
        "--settings",
        nargs="+",
        metavar="SETTING",
        help="baseline, adaptive:λref, fixed:λ (w/o Ada. ablation), keys:λref (keys-only "
        "ablation). Default: baseline and --kvsmooth's setting (baseline adaptive:0.9); "
        "--no-kvsmooth: the baseline only",
    )
    g.add_argument("--prompt", help="default: 'Please describe the image in detail.'")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens at most (paper: 512)")
    g.add_argument("--n-ctx", type=int, default=2048)
    g.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload (-1: all)")
    g.add_argument("--flash-attn", action="store_true")
    g.add_argument("--verbose", action="store_true", help="llama.cpp's log output")
    # --kvsmooth / --no-kvsmooth / --kvsmooth-mode describe one setting (the one run beside
    # the baseline when --settings is not given); window, queue and layers apply to all
    add_kvsmooth_arguments(g, default=KVSmoothConfig().lambda_ref)


def settings_from_args(args: argparse.Namespace) -> tuple[Any, ...]:
    """The settings to run: ``--settings``, or the baseline and ``--kvsmooth``'s setting."""
    from ..config import KVSmoothConfig
    from .generate import Setting

    default = KVSmoothConfig()
    single = args.kvsmooth != default.lambda_ref or args.kvsmooth_mode != default.mode
    if args.settings is not None:
        if single:
            raise EvalError(
                "--settings lists every setting; --kvsmooth / --no-kvsmooth / --kvsmooth-mode "
                "describe one: give one or the other"
            )
        return tuple(Setting.parse(s) for s in args.settings)
    if args.kvsmooth is None or args.kvsmooth == 0:
        return (Setting(),)
    return (Setting(), Setting(args.kvsmooth_mode, float(args.kvsmooth)))


def check_kvsmooth_settings(settings: tuple[Any, ...], params: Any) -> None:
    """Refuse bad KVSmooth values before any model is loaded (KVSmoothConfig's ranges)."""
    from ..config import KVSmoothConfig

    for setting in settings:
        if setting.mode is not None:
            try:
                KVSmoothConfig(lambda_ref=setting.lambda_ref, mode=setting.mode, **params.overrides())
            except ValueError as e:
                raise EvalError(f"setting {setting.name}: {e}") from None


def _generate(args: argparse.Namespace) -> int:
    from ..hub import HubError, resolve_args
    from .generate import PROMPT, GenerateOptions, KVSmoothParams, run

    try:
        resolve_args(args)  # -hf: the repository's model and mmproj, from the hub or its cache
    except HubError as e:
        raise EvalError(str(e)) from None
    if not args.model or not args.mmproj:
        raise EvalError("give --model and --mmproj, or -hf USER/MODEL[:QUANT]")

    layer_start, layer_end = args.kvsmooth_layers
    kvsmooth = KVSmoothParams(
        window=args.kvsmooth_window,
        queue=args.kvsmooth_queue,
        layer_start=layer_start,
        layer_end=layer_end,
    )
    settings = settings_from_args(args)
    check_kvsmooth_settings(settings, kvsmooth)
    options = GenerateOptions(
        model=Path(args.model),
        mmproj=Path(args.mmproj),
        images_dir=Path(args.images),
        instances=Path(args.instances),
        captions=Path(args.captions) if args.captions else None,
        out_dir=Path(args.out),
        settings=settings,
        n_images=args.n_images,
        seed=args.seed,
        prompt=args.prompt or PROMPT,
        max_tokens=args.max_tokens,
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        flash_attn=args.flash_attn,
        kvsmooth=kvsmooth,
        verbose=args.verbose,
    )
    manifest = run(options)
    print(f"captions and {manifest.name} are in {options.out_dir}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- chair


def _chair(args: argparse.Namespace) -> int:
    from .chair import caption_details, make_extractor, score_captions, summarize

    annotations = load_annotations(args.instances, args.captions)
    records = read_caption_records(args.caption_file)
    extractor = make_extractor(args.protocol, args.nltk_data)
    scores = score_captions(records, annotations, extractor)
    if args.per_caption:
        with open(args.per_caption, "w", encoding="utf-8") as f:
            for s in scores:
                f.write(json.dumps(caption_details(s)) + "\n")
    result = summarize(scores)
    out: dict[str, Any] = dict(result.as_percent())
    if args.protocol == "extended":
        out["mention_precision"] = round(100.0 * result.mention_precision, 4)
    if args.counts:
        out.update(result.counts())
    print(json.dumps(out, indent=2))
    return 0


# ---------------------------------------------------------------------------- opope


def _opope(args: argparse.Namespace) -> int:
    from .opope import evaluate_opope, opope_report

    records = read_caption_records(args.caption_file)
    if args.protocol == "halc":
        from .halc import evaluate_halc

        annotations = load_annotations(args.instances) if args.instances else None
        results = evaluate_halc(
            records,
            annotations,
            questions=args.questions,
            segmentation=args.segmentation,
            num_samples=args.num_samples,
            seed=args.seed,
            beta=args.beta,
        )
    else:
        if args.questions or args.segmentation:
            raise EvalError("--questions and --segmentation are for --protocol halc")
        if not args.instances:
            raise EvalError("--protocol extended needs --instances")
        results = evaluate_opope(
            records,
            load_annotations(args.instances),
            num_samples=args.num_samples,
            seed=args.seed,
            beta=args.beta,
        )
    print(json.dumps(opope_report(results), indent=2))
    return 0


# ---------------------------------------------------------------------------- amber


def _amber(args: argparse.Namespace) -> int:
    from .amber import (
        SpacySimilarity,
        evaluate_amber,
        judgement_details,
        load_amber,
        read_responses,
    )

    data = load_amber(args.data)
    responses = read_responses(args.responses, field=args.field)
    similarity = None if args.no_similarity else SpacySimilarity(args.spacy_model)
    result, judgements = evaluate_amber(
        responses, data, similarity, args.similarity_threshold, nltk_data=args.nltk_data
    )
    if args.per_response:
        with open(args.per_response, "w", encoding="utf-8") as f:
            for j in judgements:
                f.write(json.dumps(judgement_details(j, data.items[j.id])) + "\n")
    out: dict[str, Any] = dict(result.as_percent())
    if args.counts:
        out.update(result.counts())
    print(json.dumps(out, indent=2))
    return 0


# ---------------------------------------------------------------------------- report


def _report(args: argparse.Namespace) -> int:
    from .generate import load_manifest
    from .report import (
        ReportOptions,
        evaluate_run,
        markdown_report,
        plot_precision_recall,
    )

    manifest = load_manifest(args.run_dir)
    recorded = manifest.get("annotations", {})
    instances = args.instances or recorded.get("instances")
    captions = args.captions or recorded.get("captions")
    if not instances or not captions:
        raise EvalError("give --instances and --captions (the run did not record them)")
    annotations = load_annotations(instances, captions)
    options = ReportOptions(
        chair_protocol=args.protocol,
        opope_protocol=args.opope_protocol if args.opope else None,
        nltk_data=args.nltk_data,
        questions=tuple(args.questions) if args.questions else None,
    )
    rows = evaluate_run(args.run_dir, annotations, options)
    text = markdown_report(rows, manifest, options)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.plot:
        plot_precision_recall(
            rows, args.plot, title=f"CHAIR precision-recall: {manifest['model']['file']}"
        )
    return 0


# --------------------------------------------------------------------------- parser


def _add_nltk_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nltk-data",
        metavar="DIR",
        help="NLTK data folder searched first (punkt_tab, averaged_perceptron_tagger_eng, "
        "wordnet); default: NLTK_DATA and NLTK's own folders",
    )


def _add_chair_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=CHAIR_PROTOCOLS,
        default="opera",
        help="opera (default): OPERA chair.py's NLTK extraction, the paper's numbers; "
        "extended: no NLP model, a larger synonym table",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsmooth-eval",
        description="CHAIR, OPOPE and AMBER evaluation of KVSmooth, as in the paper "
        "(arXiv 2602.04268).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="caption a seeded sample of COCO images once per setting (resumable)",
        description="Caption N sampled COCO images with a LLaVA GGUF model, once per setting. "
        "Run it again with the same arguments to continue an interrupted run.",
    )
    add_generate_arguments(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "chair",
        help="CHAIR_S, CHAIR_I, recall, precision, F1 of a caption file",
        description="Prints one JSON object (percent): CHAIR_S, CHAIR_I, recall, and "
        "precision / F1 over distinct objects as PAI and MiddleLayer define them.",
    )
    c.add_argument("caption_file", help='JSON lines of {"image_id": ..., "caption": ...}')
    c.add_argument("--instances", required=True, help="instances_val2014.json")
    c.add_argument("--captions", required=True, help="captions_val2014.json")
    _add_chair_protocol(c)
    _add_nltk_data(c)
    c.add_argument("--per-caption", help="also write each caption's objects to this JSONL file")
    c.add_argument("--counts", action="store_true", help="add the counts behind the rates")
    c.set_defaults(func=_chair)

    o = sub.add_parser(
        "opope",
        help="OPOPE accuracy, precision, recall, F-beta over random/popular/adversarial probes",
        description="Prints one JSON object (percent): each metric's mean over the three "
        "splits, then each split's numbers.",
    )
    o.add_argument("caption_file", help='JSON lines of {"image_id": ..., "caption": ...}')
    o.add_argument(
        "--protocol",
        choices=OPOPE_PROTOCOLS,
        default="halc",
        help="halc (default): HALC's answer rule and probes, the paper's numbers; extended: "
        "answers from the extended CHAIR extractor, probes drawn per image",
    )
    o.add_argument("--instances", help="instances_val2014.json (the probes' ground truth)")
    o.add_argument(
        "--questions",
        nargs=3,
        metavar=("RANDOM", "POPULAR", "ADVERSARIAL"),
        help="POPE's question files (coco_pope_random.json ...) instead of built probes",
    )
    o.add_argument(
        "--segmentation",
        help="HALC's coco_ground_truth_segmentation.json (object lists in its order) "
        "instead of the instances file",
    )
    o.add_argument("--seed", type=int, default=0, help="probe sampling seed (default 0)")
    o.add_argument("--num-samples", type=int, default=3, help="positives per image (default 3)")
    o.add_argument("--beta", type=float, default=0.2, help="F-beta's beta (default 0.2)")
    o.set_defaults(func=_opope)

    a = sub.add_parser(
        "amber",
        help="AMBER's generative metrics: CHAIR, Cover, Hal, Cog",
        description="Prints one JSON object (percent). Responses: AMBER's JSON list of "
        '{"id", "response"}, JSON lines of {"id", "response"|"caption"}, or kvsmooth-caption '
        "records of AMBER_<id>.jpg.",
    )
    a.add_argument("responses", help="the model's responses to AMBER's generative queries")
    a.add_argument("--data", required=True, help="AMBER's data/ folder (annotations.json, "
                   "relation.json, safe_words.txt)")
    a.add_argument("--field", help="the response's key (default: response, else caption)")
    a.add_argument("--no-similarity", action="store_true",
                   help="exact word matches only, without spaCy (not AMBER's numbers)")
    a.add_argument("--spacy-model", default="en_core_web_lg",
                   help="word vectors for AMBER's near-synonym test (default en_core_web_lg)")
    a.add_argument("--similarity-threshold", type=float, default=0.8,
                   help="near synonyms: similarity above this (default 0.8)")
    _add_nltk_data(a)
    a.add_argument("--per-response", help="also write each response's objects to this JSONL file")
    a.add_argument("--counts", action="store_true", help="add the counts behind the rates")
    a.set_defaults(func=_amber)

    r = sub.add_parser(
        "report",
        help="the paper's Tables 1, 2 and 4 (Markdown) and a precision-recall PNG of a run",
    )
    r.add_argument("run_dir", help="output folder of `generate`")
    r.add_argument("--instances", help="default: the file the run recorded")
    r.add_argument("--captions", help="default: the file the run recorded")
    _add_chair_protocol(r)
    r.add_argument("--opope", action="store_true", help="add the OPOPE table (paper's Table 2)")
    r.add_argument("--opope-protocol", choices=OPOPE_PROTOCOLS, default="halc",
                   help="OPOPE protocol of Table 2 (default halc)")
    r.add_argument("--questions", nargs=3, metavar=("RANDOM", "POPULAR", "ADVERSARIAL"),
                   help="POPE's question files for Table 2 (halc)")
    _add_nltk_data(r)
    r.add_argument("--output", help="write the Markdown here instead of to stdout")
    r.add_argument("--plot", help="write the precision-recall PNG here (needs matplotlib)")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EvalError as e:
        print(f"kvsmooth-eval {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
