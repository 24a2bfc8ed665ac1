"""``python -m pykvsmooth.eval`` / ``kvsmooth-eval``: generate, chair, opope, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .coco import EvalError, load_annotations, read_caption_records


def _generate(args: argparse.Namespace) -> int:
    from .generate import PROMPT, GenerateOptions, KVSmoothParams, Setting, run

    settings = tuple(Setting.parse(s) for s in args.settings)
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
        kvsmooth=KVSmoothParams(
            window=args.window,
            queue=args.queue,
            layer_start=args.layer_start,
            layer_end=args.layer_end,
        ),
        verbose=args.verbose,
    )
    manifest = run(options)
    print(f"captions and {manifest.name} are in {options.out_dir}", file=sys.stderr)
    return 0


def _chair(args: argparse.Namespace) -> int:
    from .chair import ObjectExtractor, caption_details, score_captions, summarize

    annotations = load_annotations(args.instances, args.captions)
    records = read_caption_records(args.caption_file)
    scores = score_captions(records, annotations, ObjectExtractor())
    if args.per_caption:
        with open(args.per_caption, "w", encoding="utf-8") as f:
            for s in scores:
                f.write(json.dumps(caption_details(s)) + "\n")
    print(json.dumps(summarize(scores).as_percent(), indent=2))
    return 0


def _opope(args: argparse.Namespace) -> int:
    from .opope import evaluate_opope, opope_report

    annotations = load_annotations(args.instances)
    records = read_caption_records(args.caption_file)
    results = evaluate_opope(
        records, annotations, num_samples=args.num_samples, seed=args.seed, beta=args.beta
    )
    print(json.dumps(opope_report(results, args.beta), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .generate import load_manifest
    from .report import evaluate_run, markdown_report, plot_precision_recall

    manifest = load_manifest(args.run_dir)
    recorded = manifest.get("annotations", {})
    instances = args.instances or recorded.get("instances")
    captions = args.captions or recorded.get("captions")
    if not instances or not captions:
        raise EvalError("give --instances and --captions (the run did not record them)")
    annotations = load_annotations(instances, captions)
    rows = evaluate_run(args.run_dir, annotations, with_opope=args.opope)
    text = markdown_report(rows, manifest)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.plot:
        plot_precision_recall(
            rows, args.plot, title=f"CHAIR precision-recall: {manifest['model']['file']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsmooth-eval",
        description="CHAIR and OPOPE evaluation of KVSmooth, as in the paper (arXiv 2602.04268).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="caption a seeded sample of COCO images once per setting (resumable)",
        description="Caption N sampled COCO images with a LLaVA GGUF model, once per setting. "
        "Run it again with the same arguments to continue an interrupted run.",
    )
    g.add_argument("--model", required=True, help="language model GGUF")
    g.add_argument("--mmproj", required=True, help="vision projector (mmproj) GGUF")
    g.add_argument("--images", required=True, help="COCO val2014 image folder")
    g.add_argument("--instances", required=True, help="instances_val2014.json")
    g.add_argument("--captions", help="captions_val2014.json (recorded for `report`)")
    g.add_argument("--out", required=True, help="output folder (run.json + one JSONL per setting)")
    g.add_argument("--n-images", type=int, default=500, help="images to sample (paper: 500)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument(
        "--settings",
        nargs="+",
        default=["baseline", "adaptive:0.9"],
        metavar="SETTING",
        help="baseline, adaptive:λref, fixed:λ (w/o Ada. ablation), keys:λref "
        "(keys-only ablation); default: baseline adaptive:0.9",
    )
    g.add_argument("--prompt", help="default: 'Please describe the image in detail.'")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens at most (paper: 512)")
    g.add_argument("--n-ctx", type=int, default=2048)
    g.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload (-1: all)")
    g.add_argument("--flash-attn", action="store_true")
    g.add_argument("--window", type=float, help="KVSmooth clip half-width (default 0.2)")
    g.add_argument("--queue", type=int, help="KVSmooth entropy queue length (default 15)")
    g.add_argument("--layer-start", type=int, help="first smoothed layer (default 3)")
    g.add_argument("--layer-end", type=int, help="end of the smoothed layers, exclusive")
    g.add_argument("--verbose", action="store_true", help="llama.cpp's log output")
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "chair",
        help="CHAIR_S, CHAIR_I, precision, recall, F1 of a caption file",
        description="Prints one JSON object; rates are in percent.",
    )
    c.add_argument("caption_file", help='JSON lines of {"image_id": ..., "caption": ...}')
    c.add_argument("--instances", required=True, help="instances_val2014.json")
    c.add_argument("--captions", required=True, help="captions_val2014.json")
    c.add_argument("--per-caption", help="also write each caption's objects to this JSONL file")
    c.set_defaults(func=_chair)

    o = sub.add_parser(
        "opope",
        help="OPOPE accuracy, precision, F-beta over random/popular/adversarial probes",
        description="Prints one JSON object; rates are in percent.",
    )
    o.add_argument("caption_file", help='JSON lines of {"image_id": ..., "caption": ...}')
    o.add_argument("--instances", required=True, help="instances_val2014.json")
    o.add_argument("--seed", type=int, default=0, help="probe sampling seed (default 0)")
    o.add_argument("--num-samples", type=int, default=3, help="positives per image (default 3)")
    o.add_argument("--beta", type=float, default=0.2, help="F-beta's beta (default 0.2)")
    o.set_defaults(func=_opope)

    r = sub.add_parser(
        "report",
        help="Markdown table (paper's Table 1) and precision-recall PNG of a generate run",
    )
    r.add_argument("run_dir", help="output folder of `generate`")
    r.add_argument("--instances", help="default: the file the run recorded")
    r.add_argument("--captions", help="default: the file the run recorded")
    r.add_argument("--output", help="write the Markdown here instead of to stdout")
    r.add_argument("--plot", help="write the precision-recall PNG here (needs matplotlib)")
    r.add_argument("--opope", action="store_true", help="add the OPOPE table (paper's Table 2)")
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
