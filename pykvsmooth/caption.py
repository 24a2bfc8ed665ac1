"""``kvsmooth-caption``: caption folders of images with a LLaVA-style model and KVSmooth.

    kvsmooth-caption photos/ extra/*.jpg --model llava-v1.5-7b.Q4_K_M.gguf \\
        --mmproj mmproj-model-f16.gguf --out captions.jsonl --sidecar

Every image is opened with Pillow first, so an unreadable or corrupt file becomes an error
record instead of a crash, and any format Pillow reads reaches the model (as PNG). Outputs:

- ``--out FILE.jsonl``: one record per image: path, caption, settings, timings, or an
  ``error`` field. Each record is written and flushed as soon as its image is done; at the
  end (also after Ctrl-C) the file is rewritten with one record per image, the latest.
- ``--sidecar``: ``photo.txt`` next to ``photo.jpg``; an existing one is never replaced
  without ``--overwrite``.
- ``--compare FILE.html``: baseline and KVSmooth captions side by side, with thumbnails.

Rerunning the same command skips the images whose outputs are all there. Exit status: 0
when every image was captioned (or already was), 1 when some failed, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import html
import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO

from .config import KVSmoothConfig

DEFAULT_PROMPT = "Please describe the image in detail."
MODEL_ENV = ("PYKVSMOOTH_MODEL", "LLAMA_ARG_MODEL")
MMPROJ_ENV = ("PYKVSMOOTH_MMPROJ", "LLAMA_ARG_MMPROJ")
# the folder walk takes these; files named on the command line are tried whatever their suffix
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".tga", ".ppm", ".pgm"}
# llama_cpp.llama_chat_format handler for each --chat-format (as llama_cpp.server names them)
CHAT_HANDLERS = {
    "llava-1-5": "Llava15ChatHandler",
    "llava-1-6": "Llava16ChatHandler",
    "bakllava-1": "ObsidianChatHandler",
    "moondream": "MoondreamChatHandler",
    "nanollava": "NanoLlavaChatHandler",
    "minicpm-v-2.6": "MiniCPMv26ChatHandler",
    "qwen2.5-vl": "Qwen25VLChatHandler",
}
THUMBNAIL_PX = 256


# --- KVSmooth options, shared with pykvsmooth.server -------------------------------------


def add_kvsmooth_arguments(parser: argparse.ArgumentParser, default: Optional[float]) -> None:
    """--kvsmooth LAMBDA_REF / --no-kvsmooth and the tuning options of llama-mtmd-cli."""
    group = parser.add_argument_group("KVSmooth")
    on = group.add_mutually_exclusive_group()
    on.add_argument("--kvsmooth", type=float, metavar="LAMBDA_REF", default=default,
                    help="smoothing strength centre in [0, 1]; 0 turns KVSmooth off "
                         f"(default: {'off' if default is None else default})")
    on.add_argument("--no-kvsmooth", dest="kvsmooth", action="store_const", const=None,
                    help="turn KVSmooth off (a baseline)")
    group.add_argument("--kvsmooth-window", type=float, metavar="W", default=0.2,
                       help="lambda is clipped to LAMBDA_REF +- W (default: 0.2)")
    group.add_argument("--kvsmooth-queue", type=int, metavar="M", default=15,
                       help="capacity of the per-layer entropy queue, in [1, 256] (default: 15)")
    group.add_argument("--kvsmooth-layers", metavar="START-END", type=_layer_range, default=(None, None),
                       help="smoothed decoder layers, END exclusive (default: 3-(n_layer - 1))")
    group.add_argument("--kvsmooth-mode", choices=("adaptive", "fixed", "keys"), default="adaptive",
                       help="adaptive: lambda from the entropy rank; fixed: lambda = LAMBDA_REF; "
                            "keys: adaptive, K only (default: adaptive)")


def _layer_range(text: str) -> tuple:
    start, sep, end = text.partition("-")
    try:
        if not sep:
            raise ValueError
        return int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START-END (e.g. 3-31), got {text!r}") from None


def kvsmooth_from_args(args: argparse.Namespace) -> Optional[KVSmoothConfig]:
    """The configuration the options describe (None: off); ValueError names a bad field."""
    if args.kvsmooth is None or args.kvsmooth == 0:
        return None
    start, end = args.kvsmooth_layers
    return KVSmoothConfig(lambda_ref=args.kvsmooth, window=args.kvsmooth_window, queue=args.kvsmooth_queue,
                          layer_start=start, layer_end=end, mode=args.kvsmooth_mode)


# --- inputs -------------------------------------------------------------------------------


def find_images(inputs: Sequence[str]) -> tuple:
    """(images in order, without duplicates; inputs that matched nothing)."""
    found: List[Path] = []
    missing: List[str] = []
    seen: set = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(path)

    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append(item)
            for m in matches:
                p = Path(m)
                if p.is_dir():
                    for f in _walk(p):
                        add(f)
                elif p.suffix.lower() in IMAGE_SUFFIXES:
                    add(p)
        elif Path(item).is_dir():
            for f in _walk(Path(item)):
                add(f)
        elif Path(item).is_file():
            add(Path(item))
        else:
            missing.append(item)
    return found, missing


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                yield Path(root) / name


def load_image(path: Path) -> tuple:
    """(PNG bytes for the model, JPEG thumbnail bytes); raises ValueError for a bad image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()  # decodes everything: a truncated file fails here, not in the model
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image: {e}") from None
    if min(img.size) < 1:
        raise ValueError("cannot read image: empty")
    png = io.BytesIO()
    img.save(png, format="PNG")
    thumb = img.copy()
    thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    jpeg = io.BytesIO()
    thumb.save(jpeg, format="JPEG", quality=80)
    return png.getvalue(), jpeg.getvalue()


def sidecar_path(image: Path) -> Path:
    return image.with_suffix(".txt")


# --- outputs ------------------------------------------------------------------------------


class Records:
    """The JSONL file: finished records by resolved image path, appended as they come."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.by_key: Dict[str, Dict[str, Any]] = {}
        self.skipped_lines = 0
        self._file: Optional[TextIO] = None
        if path is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.by_key[_key(Path(record["path"]))] = record
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1  # e.g. a line cut off by a hard kill: redone

    def get(self, image: Path) -> Optional[Dict[str, Any]]:
        return self.by_key.get(_key(image))

    def add(self, record: Dict[str, Any]) -> None:
        self.by_key[_key(Path(record["path"]))] = record
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Rewrite the file with one record per image (atomically)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is None or not self.by_key:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in self.by_key.values():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


def _key(path: Path) -> str:
    return str(path.resolve())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_compare_html(path: Path, records: Iterable[Dict[str, Any]], thumbnails: Dict[str, str],
                       title: str) -> int:
    """A table: thumbnail, baseline caption, KVSmooth caption. Returns the number of rows."""
    rows = []
    for r in records:
        if "error" in r or "baseline_caption" not in r:
            continue
        thumb = thumbnails.get(_key(Path(r["path"])))
        if thumb is None:
            src = html.escape(os.path.relpath(Path(r["path"]).resolve(), path.resolve().parent))
        else:
            src = "data:image/jpeg;base64," + thumb
        rows.append(
            "<tr><td><img src=\"{src}\" alt=\"\" loading=\"lazy\"><div class=\"path\">{p}</div></td>"
            "<td>{b}</td><td>{k}</td></tr>".format(
                src=src, p=html.escape(r["path"]), b=html.escape(r["baseline_caption"]),
                k=html.escape(r["caption"])))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: 0.5em; vertical-align: top; text-align: left; }}
td:first-child {{ width: {THUMBNAIL_PX}px; }}
img {{ max-width: {THUMBNAIL_PX}px; max-height: {THUMBNAIL_PX}px; }}
.path {{ font-size: 0.8em; color: #555; word-break: break-all; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table><thead><tr><th>Image</th><th>Baseline</th><th>KVSmooth</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, page)
    return len(rows)


# --- progress -----------------------------------------------------------------------------


class Progress:
    """tqdm when it is installed, else one line per image on stderr."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.tokens = total, 0, 0
        self.start = time.monotonic()
        self.quiet = quiet
        self._bar: Any = None
        if not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    def update(self, image: Path, tokens: int, status: str) -> None:
        self.done += 1
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self._bar.update(1)
        elif not self.quiet:
            print(f"[{self.done}/{self.total}] {status} {image} ({rate:.1f} tok/s)", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- captioning -----------------------------------------------------------------------------


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    failed: List[tuple] = field(default_factory=list)
    interrupted: bool = False


class Captioner:
    def __init__(self, args: argparse.Namespace, kvsmooth: Optional[KVSmoothConfig]) -> None:
        import pykvsmooth  # noqa: F401  (before llama_cpp)
        from llama_cpp import llama_chat_format

        from .llama import Llama

        handler_cls = getattr(llama_chat_format, CHAT_HANDLERS[args.chat_format])
        with _quiet_stderr(not args.verbose):
            self.llm = Llama(model_path=args.model, chat_handler=handler_cls(clip_model_path=args.mmproj,
                                                                             verbose=args.verbose),
                             n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                             seed=args.seed, kvsmooth=kvsmooth, verbose=args.verbose)
        self.kvsmooth = kvsmooth
        self.args = args

    def caption(self, png: bytes, kvsmooth: Optional[KVSmoothConfig]) -> Dict[str, Any]:
        self.llm.kvsmooth = kvsmooth
        t0 = time.monotonic()
        with _quiet_stderr(not self.args.verbose):
            answer = self.llm.describe_image(png, self.args.prompt, max_tokens=self.args.max_tokens,
                                             temperature=self.args.temperature, seed=self.args.seed)
        seconds = time.monotonic() - t0
        return {
            "caption": answer.text,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "seconds": round(seconds, 3),
        }


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """mtmd and clip print progress on stderr (fd 2) whatever `verbose` says: hide it."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C back until the block is done, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def settings_record(args: argparse.Namespace, kvsmooth: Optional[KVSmoothConfig]) -> Dict[str, Any]:
    return {
        "model": os.path.basename(args.model), "mmproj": os.path.basename(args.mmproj),
        "chat_format": args.chat_format, "prompt": args.prompt, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "seed": args.seed,
        "kvsmooth": None if kvsmooth is None else {k: v for k, v in kvsmooth.as_dict().items() if k != "trace"},
    }


def run(args: argparse.Namespace, kvsmooth: Optional[KVSmoothConfig]) -> Summary:
    images, missing = find_images(args.inputs)
    records = Records(args.out)
    summary = Summary()
    for item in missing:
        summary.failed.append((item, "no such file, folder or matching image"))
    thumbnails: Dict[str, str] = {}
    settings = settings_record(args, kvsmooth)

    # one sidecar per image: photo.jpg and photo.png in one folder would share photo.txt
    owners: Dict[Path, Path] = {}
    clashes: Dict[Path, Path] = {}
    if args.sidecar:
        for image in images:
            other = owners.setdefault(sidecar_path(image).resolve(), image)
            if other is not image:
                clashes[image] = other

    def finished(image: Path) -> bool:
        if args.out is not None or args.compare is not None:
            r = records.get(image)
            if r is None or "error" in r or (args.compare is not None and "baseline_caption" not in r):
                return False
        if args.sidecar and not args.overwrite and not sidecar_path(image).exists():
            r = records.get(image)
            if r is None or "error" in r:
                return False
            write_text_atomic(sidecar_path(image), r["caption"] + "\n")  # from the JSONL
        return args.out is not None or args.compare is not None or args.sidecar

    todo = images if args.overwrite else [i for i in images if not finished(i)]
    summary.skipped = len(images) - len(todo)
    if args.compare is not None:
        for image in images:
            if image not in todo:
                with contextlib.suppress(ValueError, OSError):
                    thumbnails[_key(image)] = base64.b64encode(load_image(image)[1]).decode()

    captioner: Optional[Captioner] = None
    progress = Progress(len(todo), args.quiet)
    t_start = time.monotonic()
    try:
        for image in todo:
            record: Dict[str, Any] = {"path": str(image)}
            tokens = 0
            try:
                if image in clashes:
                    raise ValueError(f"its sidecar {sidecar_path(image)} is also the sidecar of {clashes[image]}")
                png, thumb = load_image(image)
                if captioner is None:
                    captioner = Captioner(args, kvsmooth)
                result = captioner.caption(png, kvsmooth)
                baseline = captioner.caption(png, None) if args.compare is not None else None
                record["caption"] = result.pop("caption")
                if baseline is not None:
                    record["baseline_caption"] = baseline.pop("caption")
                    thumbnails[_key(image)] = base64.b64encode(thumb).decode()
                record["settings"] = settings
                record["timings"] = result
                tokens = result["completion_tokens"]
                if baseline is not None:
                    record["baseline_timings"] = baseline
                    tokens += baseline["completion_tokens"]
            except ValueError as e:  # unreadable image, or one the model could not take
                record["error"] = str(e)
            with _deferred_interrupt():  # an image's outputs are written all or none
                records.add(record)
                if "error" not in record and args.sidecar:
                    target = sidecar_path(image)
                    if args.overwrite or not target.exists():
                        write_text_atomic(target, record["caption"] + "\n")
            if "error" in record:
                summary.failed.append((str(image), record["error"]))
                progress.write(f"kvsmooth-caption: {image}: {record['error']}")
            else:
                summary.captioned += 1
                summary.tokens += tokens
            progress.update(image, tokens, "failed" if "error" in record else "done")
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.monotonic() - t_start
        progress.close()
        records.close()
        if args.compare is not None:
            ordered = [records.get(i) for i in images]
            write_compare_html(args.compare, [r for r in ordered if r is not None], thumbnails,
                               title=f"Baseline vs KVSmooth: {settings['model']}")
        if captioner is not None:
            captioner.llm.close()
    return summary


def print_summary(summary: Summary, args: argparse.Namespace, out: TextIO = sys.stderr) -> None:
    rate = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
    lines = [("interrupted: " if summary.interrupted else "")
             + f"{summary.captioned} captioned, {summary.skipped} already done, {len(summary.failed)} failed"
             + f" in {summary.seconds:.1f} s ({rate:.1f} tokens/s)"]
    for path, error in summary.failed:
        lines.append(f"  failed: {path}: {error}")
    if args.out is not None:
        lines.append(f"records: {args.out}")
    if args.compare is not None:
        lines.append(f"comparison: {args.compare}")
    print("\n".join(lines), file=out, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvsmooth-caption",
        description="Caption images with a LLaVA-style model and KVSmooth (arXiv 2602.04268).",
        epilog="Exit status: 0 all captioned, 1 some images failed, 2 bad usage, 130 interrupted.")
    ap.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER|GLOB",
                    help="image files, folders (searched recursively) and glob patterns")
    ap.add_argument("--model", "-m", default=_env(MODEL_ENV),
                    help="language model GGUF (env: PYKVSMOOTH_MODEL or LLAMA_ARG_MODEL)")
    ap.add_argument("--mmproj", default=_env(MMPROJ_ENV),
                    help="multimodal projector GGUF (env: PYKVSMOOTH_MMPROJ or LLAMA_ARG_MMPROJ)")
    ap.add_argument("--chat-format", choices=sorted(CHAT_HANDLERS), default="llava-1-5",
                    help="prompt format and image handler (default: llava-1-5)")
    ap.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help=f"default: {DEFAULT_PROMPT!r}")
    ap.add_argument("--max-tokens", type=int, default=512, help="default: 512")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default: 0)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_kvsmooth_arguments(ap, default=0.9)
    ap.add_argument("--out", "-o", type=Path, metavar="FILE.jsonl", help="append one JSON record per image")
    ap.add_argument("--sidecar", action="store_true", help="write IMAGE.txt next to each image")
    ap.add_argument("--overwrite", action="store_true",
                    help="caption every image again and replace existing sidecar files")
    ap.add_argument("--compare", type=Path, metavar="FILE.html",
                    help="also caption without KVSmooth and write both side by side")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=-1,
                    help="layers to offload to the GPU, -1 for all (default: -1; no effect on a CPU build)")
    ap.add_argument("--n-ctx", type=int, default=4096, help="context size (default: 4096)")
    ap.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def _env(names: Sequence[str]) -> Optional[str]:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.model or not args.mmproj:
        ap.error("--model and --mmproj are required (or set PYKVSMOOTH_MODEL and PYKVSMOOTH_MMPROJ)")
    for name in ("model", "mmproj"):
        if not Path(getattr(args, name)).is_file():
            ap.error(f"--{name}: no such file: {getattr(args, name)}")
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    if args.out is None and not args.sidecar and args.compare is None:
        ap.error("nothing to write: give --out FILE.jsonl, --sidecar and/or --compare FILE.html")
    try:
        kvsmooth = kvsmooth_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    if args.compare is not None and kvsmooth is None:
        ap.error("--compare compares against KVSmooth: it cannot be combined with --no-kvsmooth")

    try:
        summary = run(args, kvsmooth)
    except KeyboardInterrupt:  # while loading the model: nothing to keep
        print("kvsmooth-caption: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the model failed to load, KVSmooth was refused, ...
        print(f"kvsmooth-caption: error: {e}", file=sys.stderr)
        return 1
    print_summary(summary, args)
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
