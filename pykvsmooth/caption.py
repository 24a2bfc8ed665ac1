"""``kvsmooth-caption``: caption folders of images with a vision model and KVSmooth.

    kvsmooth-caption photos/                      # the default model, sidecars photo.txt
    kvsmooth-caption photos/ extra/*.jpg -hf second-state/Llava-v1.5-7B-GGUF:Q4_K_M \\
        --out captions.jsonl --sidecar --prefix "ohwx, "
    kvsmooth-caption photos/ --model m.gguf --mmproj p.gguf --out c.jsonl --shard 0/4
    kvsmooth-caption manifest.parquet --ray auto --out captions.parquet

Every image is opened with Pillow first, so an unreadable or corrupt file becomes an error
record instead of a crash, and any format Pillow reads reaches the model (as PNG). Inputs
are image files, folders (recursive), glob patterns, and manifests: ``*.txt``/``*.lst`` (one
path a line), ``*.jsonl`` (objects with ``"path"``), ``*.parquet`` (a ``path`` column);
relative paths in a manifest are relative to its folder. Outputs:

- ``--out FILE.jsonl``: one record per image: path, caption, prompt, settings, timings, or
  an ``error`` field. Each record is written and flushed as soon as its image is done; at
  the end (also after Ctrl-C) the file is rewritten with one record per image, the latest.
  ``--out DIR.parquet``: the same records as a folder of Parquet files (columns path,
  caption, error, record), written every few hundred images (needs pyarrow).
- ``--sidecar`` (the default when no output is named): ``photo.txt`` next to
  ``photo.jpg``; ``--existing`` says what happens to one that is already there.
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
import re
import signal
import string
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, TextIO, Tuple, Union

from . import config, handlers, hub
from .config import KVSmoothConfig

DEFAULT_PROMPT = "Please describe the image in detail."
MODEL_ENV = ("PYKVSMOOTH_MODEL", "LLAMA_ARG_MODEL")
MMPROJ_ENV = ("PYKVSMOOTH_MMPROJ", "LLAMA_ARG_MMPROJ")
# the folder walk takes these; files named on the command line are tried whatever their suffix
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".tga", ".ppm", ".pgm"}
# inputs with these suffixes are lists of images, not images
LIST_SUFFIXES = {".txt", ".lst"}
MANIFEST_SUFFIXES = LIST_SUFFIXES | {".jsonl", ".parquet"}
# --existing: what to do with a sidecar that is already there
EXISTING_MODES = ("skip", "overwrite", "append", "prepend")
# kept for callers of the old name; handlers.CHAT_HANDLERS is the table
CHAT_HANDLERS = handlers.CHAT_HANDLERS
THUMBNAIL_PX = 256
PARQUET_PART_ROWS = 256


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
    group.add_argument("--kvsmooth-window", type=float, metavar="W", default=config.DEFAULT_WINDOW,
                       help=f"lambda is clipped to LAMBDA_REF +- W (default: {config.DEFAULT_WINDOW:g})")
    group.add_argument("--kvsmooth-queue", type=int, metavar="M", default=config.DEFAULT_QUEUE,
                       help=f"capacity of the per-layer entropy queue, in [1, {config.MAX_QUEUE}] "
                            f"(default: {config.DEFAULT_QUEUE})")
    group.add_argument("--kvsmooth-layers", metavar="START-END", type=_layer_range, default=(None, None),
                       help=f"smoothed decoder layers, END exclusive (default: {config.DEFAULT_LAYERS_TEXT})")
    group.add_argument("--kvsmooth-mode", choices=tuple(config.MODES), default=config.DEFAULT_MODE,
                       help="adaptive: lambda from the entropy rank; fixed: lambda = LAMBDA_REF; "
                            f"keys: adaptive, K only (default: {config.DEFAULT_MODE})")
    group.add_argument("--kvsmooth-impl", choices=tuple(config.IMPLS), default=config.DEFAULT_IMPL,
                       help="auto: the KVSmooth op where the device has it, else stock ggml ops; fused: the op "
                            "only; composed: stock ggml ops only (every backend, slower) "
                            f"(default: {config.DEFAULT_IMPL})")


def _layer_range(text: str) -> Tuple[int, int]:
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
                          layer_start=start, layer_end=end, mode=args.kvsmooth_mode, impl=args.kvsmooth_impl)


# --- inputs -------------------------------------------------------------------------------


def find_images(inputs: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """(images in order, without duplicates; inputs that matched nothing). A manifest that
    cannot be read raises ValueError."""
    found: List[Path] = []
    missing: List[str] = []
    seen: Set[Path] = set()

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
        elif Path(item).is_file() and Path(item).suffix.lower() in MANIFEST_SUFFIXES:
            for p in read_manifest(Path(item)):
                add(p)
        elif Path(item).is_file():
            add(Path(item))
        else:
            missing.append(item)
    return found, missing


def read_manifest(path: Path) -> List[Path]:
    """The image paths a list (one a line, # comments), JSONL (``"path"`` or ``"image"``
    fields) or Parquet (a ``path`` column) names, relative ones taken from its folder."""
    suffix = path.suffix.lower()
    names: List[str] = []
    if suffix in LIST_SUFFIXES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                names.append(line.strip())
    elif suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                names.append(str(row["path"] if "path" in row else row["image"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a \"path\" field") from None
    else:
        table = _read_parquet(path, columns=None)
        if "path" not in table.column_names:
            raise ValueError(f"{path}: a Parquet manifest needs a 'path' column (it has "
                             f"{', '.join(table.column_names)})")
        names = [str(p) for p in table.column("path").to_pylist() if p is not None]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, names)]


def _read_parquet(path: Path, columns: Optional[List[str]]) -> Any:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        raise ValueError(f"{path}: Parquet needs pyarrow: pip install pyarrow (or 'pykvsmooth[ray]')") from None
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path}: cannot read Parquet: {e}") from None


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                yield Path(root) / name


def parse_shard(text: str) -> Tuple[int, int]:
    """``K/N`` -> (K, N) with 0 <= K < N."""
    k, sep, n = text.partition("/")
    try:
        if not sep:
            raise ValueError
        shard = (int(k), int(n))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be in [0, N) and N at least 1")
    return shard


def in_shard(image: Path, shard: Optional[Tuple[int, int]]) -> bool:
    """Whether this image belongs to shard K of N: by a CRC-32 of its path as found, so a
    machine running the same command with another K gets disjoint images, and images added
    later do not move the others between shards."""
    if shard is None:
        return True
    return zlib.crc32(image.as_posix().encode("utf-8")) % shard[1] == shard[0]


def load_image(source: Union[Path, bytes]) -> Tuple[bytes, bytes]:
    """(PNG bytes for the model, JPEG thumbnail bytes) of a file or encoded bytes; raises
    ValueError for a bad image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
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


def read_existing(image: Path) -> Optional[str]:
    """The text of the image's sidecar, if there is one (the ``{existing}`` variable)."""
    try:
        return sidecar_path(image).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


# --- prompts and captions -------------------------------------------------------------------

PROMPT_VARIABLES = {
    "filename": "the image's file name (photo.jpg)",
    "stem": "its name without the suffix (photo)",
    "folder": "the name of its folder",
    "path": "its path as found",
    "existing": "the text of its sidecar photo.txt (tags or a caption), empty if none",
}


def check_prompt(template: str) -> None:
    """ValueError naming an unknown ``{variable}`` or a stray brace."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt template {template!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    for name in fields:
        if name not in PROMPT_VARIABLES:
            raise ValueError(f"prompt template: unknown variable {{{name}}}; known: "
                             + ", ".join("{" + v + "}" for v in PROMPT_VARIABLES)
                             + " (write {{ and }} for literal braces)")


def render_prompt(template: str, image: Optional[Path], existing: Optional[str]) -> str:
    values = {"filename": "", "stem": "", "folder": "", "path": "", "existing": existing or ""}
    if image is not None:
        values.update(filename=image.name, stem=image.stem, folder=image.resolve().parent.name,
                      path=str(image))
    return template.format_map(values)


def merge_sidecar(mode: str, existing: Optional[str], caption: str, separator: str) -> str:
    """The sidecar text after writing ``caption`` in this --existing mode."""
    if not existing or mode in ("skip", "overwrite"):
        return caption
    return existing + separator + caption if mode == "append" else caption + separator + existing


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
                    self._load(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1  # e.g. a line cut off by a hard kill: redone

    def _load(self, record: Dict[str, Any]) -> None:
        self.by_key[_key(Path(record["path"]))] = record

    def get(self, image: Path) -> Optional[Dict[str, Any]]:
        return self.by_key.get(_key(image))

    def add(self, record: Dict[str, Any]) -> None:
        self._load(record)
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


class ParquetRecords(Records):
    """The same records in a folder of Parquet files (``part-*.parquet``; columns path,
    caption, error and record, the whole record as JSON). New records are written as a part
    every PARQUET_PART_ROWS images; at the end the folder is rewritten as one part."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_key = {}
        self.skipped_lines = 0
        self._file = None
        self._pending: List[Dict[str, Any]] = []
        self._parts = 0
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path}: a Parquet output is a folder, and this is a file")
        for part in sorted(path.glob("part-*.parquet")) if path.is_dir() else []:
            for text in _read_parquet(part, columns=["record"]).column("record").to_pylist():
                try:
                    self._load(json.loads(text))
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
            self._parts += 1

    def add(self, record: Dict[str, Any]) -> None:
        self._load(record)
        self._pending.append(record)
        if len(self._pending) >= PARQUET_PART_ROWS:
            self._write_part(self._pending, f"part-{self._parts:05d}-{os.getpid()}.parquet")
            self._pending = []

    def _write_part(self, records: List[Dict[str, Any]], name: str) -> None:
        import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

        table = pa.table({
            "path": [r["path"] for r in records],
            "caption": [r.get("caption") for r in records],
            "error": [r.get("error") for r in records],
            "record": [json.dumps(r, ensure_ascii=False) for r in records],
        })
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path / name)
        self._parts += 1

    def close(self) -> None:
        assert self.path is not None
        if not self._pending and self._parts <= 1:
            return
        old = sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []
        self._pending = []
        self._write_part(list(self.by_key.values()), f"part-final-{os.getpid()}.parquet")
        for part in old:
            part.unlink()
        os.replace(self.path / f"part-final-{os.getpid()}.parquet", self.path / "part-00000.parquet")
        self._parts = 1


def open_records(path: Optional[Path]) -> Records:
    if path is not None and path.suffix.lower() == ".parquet":
        return ParquetRecords(path)
    return Records(path)


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
    """A tqdm bar (images/s, ETA, tokens/s) when stderr is a terminal; silent otherwise."""

    def __init__(self, total: int, quiet: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.tokens = total, 0, 0
        self.start = time.monotonic()
        self.stream = stream
        self._bar: Any = None
        if not quiet and total > 0 and _isatty(stream):
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=stream, smoothing=0.1)

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        if self._bar is not None:
            rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
            self._bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self._bar.update(1)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- captioning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSettings:
    """Everything that decides a caption, but KVSmooth (given per call)."""

    model: str
    mmproj: str
    chat_format: str = handlers.AUTO
    prompt: str = DEFAULT_PROMPT
    prefix: str = ""
    suffix: str = ""
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    threads: Optional[int] = None
    verbose: bool = False

    def __post_init__(self) -> None:
        check_prompt(self.prompt)
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.chat_format not in handlers.CHAT_FORMATS:
            raise ValueError(f"unknown chat format {self.chat_format!r}; one of {', '.join(handlers.CHAT_FORMATS)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CaptionSettings":
        return cls(model=args.model, mmproj=args.mmproj, chat_format=args.chat_format, prompt=args.prompt,
                   prefix=args.prefix, suffix=args.suffix, max_tokens=args.max_tokens,
                   temperature=args.temperature, seed=args.seed, n_ctx=args.n_ctx,
                   n_gpu_layers=args.n_gpu_layers, threads=args.threads, verbose=args.verbose)

    def resolved(self) -> "CaptionSettings":
        """With ``auto`` replaced by the chat format the files call for."""
        if self.chat_format != handlers.AUTO:
            return self
        return CaptionSettings(**{**asdict(self), "chat_format": handlers.choose_chat_format(self.model, self.mmproj)})


class Captioner:
    """One model (and projector) loaded, captioning PNG bytes with any KVSmooth setting."""

    def __init__(self, settings: CaptionSettings, kvsmooth: Optional[KVSmoothConfig]) -> None:
        import pykvsmooth  # noqa: F401  (before llama_cpp)

        from .llama import Llama

        settings = settings.resolved()
        with _quiet_stderr(not settings.verbose):
            handler = handlers.make_chat_handler(settings.chat_format, settings.mmproj, settings.verbose)
            self.llm = Llama(model_path=settings.model, chat_handler=handler, n_ctx=settings.n_ctx,
                             n_gpu_layers=settings.n_gpu_layers, n_threads=settings.threads,
                             seed=settings.seed, kvsmooth=kvsmooth, verbose=settings.verbose)
        self.settings = settings

    def caption(self, png: bytes, prompt: str, kvsmooth: Optional[KVSmoothConfig]) -> Dict[str, Any]:
        """{"caption" (with prefix and suffix), "prompt_tokens", "completion_tokens", "seconds"}."""
        s = self.settings
        self.llm.kvsmooth = kvsmooth
        t0 = time.monotonic()
        with _quiet_stderr(not s.verbose):
            answer = self.llm.describe_image(png, prompt, max_tokens=s.max_tokens, temperature=s.temperature,
                                             seed=s.seed)
        return {
            "caption": s.prefix + answer.text + s.suffix,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "seconds": round(time.monotonic() - t0, 3),
        }

    def close(self) -> None:
        self.llm.close()


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


@contextlib.contextmanager
def _sticky_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: llama.cpp calls back
    into Python (its log), and an interrupt raised inside such a callback is swallowed by
    ctypes; the loop checks the event between images, so the run stops anyway."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def on_sigint(signum: int, frame: Any) -> None:
        event.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def settings_record(args: argparse.Namespace, settings: CaptionSettings,
                    kvsmooth: Optional[KVSmoothConfig]) -> Dict[str, Any]:
    """What the JSONL says about how its captions were made."""
    record: Dict[str, Any] = {
        "model": os.path.basename(settings.model), "mmproj": os.path.basename(settings.mmproj),
        "chat_format": settings.chat_format, "prompt": settings.prompt, "max_tokens": settings.max_tokens,
        "temperature": settings.temperature, "seed": settings.seed,
        "kvsmooth": None if kvsmooth is None else {k: v for k, v in kvsmooth.as_dict().items() if k != "trace"},
    }
    got = getattr(args, "hub_model", None)
    if got is not None:
        record["hf_repo"] = got.repo
        record["hf_revision"] = got.revision
    if args.prompt_file is not None:
        record["prompt_file"] = str(args.prompt_file)
    if settings.prefix:
        record["prefix"] = settings.prefix
    if settings.suffix:
        record["suffix"] = settings.suffix
    if args.sidecar:
        record["existing"] = args.existing
        if args.existing in ("append", "prepend"):
            record["separator"] = args.separator
    if args.shard is not None:
        record["shard"] = f"{args.shard[0]}/{args.shard[1]}"
    return record


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class Job:
    """What a run has to do, and where its results go: shared by the single-process loop and
    the Ray front end (pykvsmooth.ray)."""

    args: argparse.Namespace
    settings: CaptionSettings
    kvsmooth: Optional[KVSmoothConfig]
    images: List[Path]
    todo: List[Path]
    records: Records
    summary: Summary
    record_settings: Dict[str, Any]
    clashes: Dict[Path, Path]
    thumbnails: Dict[str, str] = field(default_factory=dict)

    def prompt_for(self, image: Path) -> Tuple[str, Optional[str]]:
        """(the rendered prompt, the sidecar text there was before this run wrote one)."""
        existing = read_existing(image)
        return render_prompt(self.settings.prompt, image, existing), existing

    def commit(self, image: Path, record: Dict[str, Any], existing: Optional[str], tokens: int,
               progress: Progress) -> None:
        """Write one image's outputs (all or none, Ctrl-C waits) and count it."""
        args = self.args
        with _deferred_interrupt():
            self.records.add(record)
            if "error" not in record and args.sidecar:
                target = sidecar_path(image)
                if args.existing != "skip" or not target.exists():
                    write_text_atomic(target, merge_sidecar(args.existing, existing, record["caption"],
                                                            args.separator) + "\n")
        if "error" in record:
            self.summary.failed.append((str(image), record["error"]))
            progress.write(f"kvsmooth-caption: {image}: {record['error']}")
        else:
            self.summary.captioned += 1
            self.summary.tokens += tokens
        progress.update(tokens)

    def finish(self) -> None:
        self.records.close()
        if self.args.compare is not None:
            ordered = [self.records.get(i) for i in self.images]
            write_compare_html(self.args.compare, [r for r in ordered if r is not None], self.thumbnails,
                               title=f"Baseline vs KVSmooth: {self.record_settings['model']}")


def plan(args: argparse.Namespace, settings: CaptionSettings, kvsmooth: Optional[KVSmoothConfig]) -> Job:
    """Find the images, read the outputs there are, and decide which images to caption."""
    images, missing = find_images(args.inputs)
    images = [i for i in images if in_shard(i, args.shard)]
    records = open_records(args.out)
    summary = Summary()
    for item in missing:
        summary.failed.append((item, "no such file, folder or matching image"))

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
        if args.sidecar and args.existing == "skip" and not sidecar_path(image).exists():
            r = records.get(image)
            if r is None or "error" in r:
                return False
            write_text_atomic(sidecar_path(image), r["caption"] + "\n")  # from the JSONL
        if args.sidecar and args.existing in ("append", "prepend") and not sidecar_path(image).exists():
            write_text_atomic(sidecar_path(image), records.by_key[_key(image)]["caption"] + "\n")
        return True

    todo = images if args.existing == "overwrite" else [i for i in images if not finished(i)]
    summary.skipped = len(images) - len(todo)
    job = Job(args, settings, kvsmooth, images, todo, records, summary,
              settings_record(args, settings, kvsmooth), clashes)
    if args.compare is not None:
        for image in images:
            if image not in todo:
                with contextlib.suppress(ValueError, OSError):
                    job.thumbnails[_key(image)] = base64.b64encode(load_image(image)[1]).decode()
    return job


def run(args: argparse.Namespace, kvsmooth: Optional[KVSmoothConfig]) -> Summary:
    """Caption in this process, one image after the other."""
    settings = CaptionSettings.from_args(args).resolved()
    job = plan(args, settings, kvsmooth)
    summary = job.summary
    loaded: List[Captioner] = []  # the model, once the first image needs it
    progress = Progress(len(job.todo), args.quiet)
    t_start = time.monotonic()
    try:
        with _sticky_interrupt() as interrupted:
            for image in job.todo:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                _caption_one(job, image, progress, loaded)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.monotonic() - t_start
        progress.close()
        job.finish()
        for captioner in loaded:
            captioner.close()
    return summary


def _caption_one(job: Job, image: Path, progress: Progress, loaded: List[Captioner]) -> None:
    """Caption one image (and its baseline for --compare) and commit its outputs."""
    prompt, existing = job.prompt_for(image)
    record: Dict[str, Any] = {"path": str(image)}
    tokens = 0
    try:
        if image in job.clashes:
            raise ValueError(f"its sidecar {sidecar_path(image)} is also the sidecar of {job.clashes[image]}")
        png, thumb = load_image(image)
        if not loaded:
            loaded.append(Captioner(job.settings, job.kvsmooth))
        captioner = loaded[0]
        result = captioner.caption(png, prompt, job.kvsmooth)
        baseline = captioner.caption(png, prompt, None) if job.args.compare is not None else None
        record["caption"] = result.pop("caption")
        if baseline is not None:
            record["baseline_caption"] = baseline.pop("caption")
            job.thumbnails[_key(image)] = base64.b64encode(thumb).decode()
        record["prompt"] = prompt
        record["settings"] = job.record_settings
        record["timings"] = result
        tokens = result["completion_tokens"]
        if baseline is not None:
            record["baseline_timings"] = baseline
            tokens += baseline["completion_tokens"]
    except ValueError as e:  # unreadable image, or one the model could not take
        record = {"path": str(image), "error": str(e)}
    job.commit(image, record, existing, tokens, progress)


def print_summary(summary: Summary, args: argparse.Namespace, out: TextIO = sys.stderr) -> None:
    rate = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
    lines = [("interrupted: " if summary.interrupted else "")
             + f"{summary.captioned} captioned, {summary.skipped} skipped, {len(summary.failed)} failed"
             + f" in {summary.seconds:.1f} s ({rate:.1f} tokens/s)"]
    for path, error in summary.failed:
        lines.append(f"  failed: {path}: {error}")
    if args.out is not None:
        lines.append(f"records: {args.out}")
    if args.sidecar:
        lines.append("sidecars: IMAGE.txt next to each image")
    if args.compare is not None:
        lines.append(f"comparison: {args.compare}")
    print("\n".join(lines), file=out, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvsmooth-caption",
        description="Caption images with a vision model and KVSmooth (arXiv 2602.04268).",
        epilog="Prompt variables: " + "; ".join(f"{{{k}}} {v}" for k, v in PROMPT_VARIABLES.items())
               + ". Exit status: 0 all captioned, 1 some images failed, 2 bad usage, 130 interrupted.")
    ap.add_argument("inputs", nargs="*", metavar="IMAGE|FOLDER|GLOB|MANIFEST",
                    help="image files, folders (searched recursively), glob patterns, and lists "
                         "(.txt/.lst), JSONL or Parquet manifests of image paths")
    ap.add_argument("--model", "-m", default=None,
                    help="language model GGUF (env: PYKVSMOOTH_MODEL or LLAMA_ARG_MODEL; default: "
                         f"-hf {hub.DEFAULT_REPO})")
    ap.add_argument("--mmproj", "-mm", default=None,
                    help="multimodal projector GGUF (env: PYKVSMOOTH_MMPROJ or LLAMA_ARG_MMPROJ)")
    hub.add_hub_arguments(ap, default_repo=hub.DEFAULT_REPO)
    ap.add_argument("--chat-format", choices=handlers.CHAT_FORMATS, default=handlers.AUTO,
                    help="prompt format and image handler; auto: llava-1-5 for a LLaVA projector, else "
                         "mtmd, the model's own chat template (default: auto)")
    prompt = ap.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", "-p", default=None,
                        help=f"prompt template, with {{variables}} (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", "-f", type=Path, metavar="FILE", help="read the prompt template from FILE")
    ap.add_argument("--prefix", default="", metavar="TEXT",
                    help="put TEXT before every caption, e.g. a trigger word: --prefix 'ohwx, '")
    ap.add_argument("--suffix", default="", metavar="TEXT", help="put TEXT after every caption")
    ap.add_argument("--max-tokens", type=int, default=512, help="default: 512")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default: 0)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_kvsmooth_arguments(ap, default=config.DEFAULT_LAMBDA_REF)
    out = ap.add_argument_group("Outputs (default: --sidecar)")
    out.add_argument("--out", "-o", type=Path, metavar="FILE.jsonl|DIR.parquet",
                     help="one record per image: JSONL (appended as images finish) or a Parquet folder")
    out.add_argument("--sidecar", action="store_true", help="write IMAGE.txt next to each image")
    out.add_argument("--existing", choices=EXISTING_MODES, default=None,
                     help="an IMAGE.txt that is already there: skip (keep it; default), overwrite (caption "
                          "every image again and replace it), append / prepend (add the caption after / "
                          "before its text; needs --out, which records what was done)")
    out.add_argument("--separator", default=", ", metavar="TEXT",
                     help="between the old text and the caption for append/prepend (default: ', ')")
    out.add_argument("--overwrite", action="store_true", help="the same as --existing overwrite")
    out.add_argument("--compare", type=Path, metavar="FILE.html",
                     help="also caption without KVSmooth and write both side by side")
    scale = ap.add_argument_group("Many machines")
    scale.add_argument("--shard", type=parse_shard, metavar="K/N",
                       help="caption only shard K of N (0-based) of the images, to split a data set over "
                            "machines without Ray; give each its own --out")
    scale.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="caption on Ray Data actors: 'local' (default) starts Ray on this machine, "
                            "'auto' or HOST:PORT joins a cluster started with `ray start`")
    scale.add_argument("--ray-actors", type=int, metavar="N",
                       help="model copies (actors); default: one per GPU of the cluster, else 1")
    scale.add_argument("--ray-gpus", type=float, metavar="G",
                       help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    scale.add_argument("--ray-cpus", type=float, default=1.0, metavar="C", help="CPUs per actor (default: 1)")
    scale.add_argument("--ray-batch-size", type=int, default=8, metavar="B",
                       help="images per batch handed to an actor (default: 8)")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=-1,
                    help="layers to offload to the GPU, -1 for all (default: -1; no effect on a CPU build)")
    ap.add_argument("--n-ctx", type=int, default=4096, help="context size (default: 4096)")
    ap.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    ap.add_argument("--quiet", "-q", action="store_true",
                    help="no progress bar (there is none anyway when stderr is not a terminal)")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    return ap


def _env(names: Sequence[str]) -> Optional[str]:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


_RAY_ADDRESS = re.compile(r"^(local|auto|[a-z]+://.+|[^/\\]+:[0-9]+)$")


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse and check the command line (exit 2 on bad usage), fetching a hub model."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.ray is not None and not _RAY_ADDRESS.match(args.ray):
        args.inputs.insert(0, args.ray)  # `--ray photos/`: the folder is an input, not an address
        args.ray = "local"
    if not args.inputs:
        ap.error("nothing to caption: name images, folders, globs or manifests")
    if args.overwrite:
        if args.existing not in (None, "overwrite"):
            ap.error(f"--overwrite and --existing {args.existing} contradict each other")
        args.existing = "overwrite"
    if args.out is None and not args.sidecar and args.compare is None:
        args.sidecar = True  # the default output, as kohya's and TagGUI's captioners write
    if args.existing is not None and not args.sidecar:
        ap.error("--existing applies to sidecar files: add --sidecar")
    args.existing = args.existing or "skip"
    if args.existing in ("append", "prepend") and args.out is None:
        ap.error(f"--existing {args.existing} needs --out FILE.jsonl: it records which sidecars were "
                 "already extended, so that a rerun does not add the caption twice")
    if args.prompt_file is not None:
        try:
            args.prompt = args.prompt_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            ap.error(f"--prompt-file: cannot read {args.prompt_file}: {e}")
    if args.prompt is None:
        args.prompt = DEFAULT_PROMPT
    try:
        check_prompt(args.prompt)
    except ValueError as e:
        ap.error(str(e))
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    if args.ray is not None and args.compare is not None:
        ap.error("--compare runs in one process: leave out --ray")
    for name in ("ray_actors", "ray_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.model is not None and args.hf_repo is not None:
        ap.error("give --model or --hf-repo, not both")
    if args.model is None and args.hf_repo is None:
        args.model = _env(MODEL_ENV)
    if args.mmproj is None:
        args.mmproj = _env(MMPROJ_ENV)
    if args.model is not None and not args.mmproj:
        ap.error("--model needs --mmproj (or set PYKVSMOOTH_MMPROJ), or use -hf REPO for both")
    args.hub_model = hub.resolve_args(args, default_repo=hub.DEFAULT_REPO, parser=ap)
    for name in ("model", "mmproj"):
        if not Path(getattr(args, name)).is_file():
            ap.error(f"--{name}: no such file: {getattr(args, name)}")
    return ap, args


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap, args = parse_args(argv)
    try:
        kvsmooth = kvsmooth_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    if args.compare is not None and kvsmooth is None:
        ap.error("--compare compares against KVSmooth: it cannot be combined with --no-kvsmooth")

    try:
        if args.ray is not None:
            from .ray import run_cli

            summary = run_cli(args, kvsmooth)
        else:
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
