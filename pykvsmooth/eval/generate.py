"""Caption a seeded sample of COCO images once per setting, as the paper's CHAIR runs do.

The paper (section 5.1, Appendix B): 500 random COCO val2014 images, the prompt "Please
describe the image in detail.", greedy decoding, at most 512 new tokens. Each setting's
captions go to ``OUT/<setting>.jsonl``, one ``{"image_id", "caption", ...}`` record a line,
written as soon as a caption is done; ``OUT/run.json`` records the models (names, sizes,
SHA-256), the annotation files, the sampled image ids and every setting's parameters.
Running the same command again continues where it stopped; a run whose models, images,
prompt or settings differ from the recorded ones is refused instead of being mixed in.

Only :class:`LlamaCaptioner` needs the native build (``pykvsmooth.Llama``); it is imported
when a run starts, so the rest of the evaluation works without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Protocol

from ..config import DEFAULT_LAMBDA_REF
from ..config import MODES as _CONFIG_MODES
from .coco import EvalError, PathLike, load_annotations, sample_image_ids

PROMPT = "Please describe the image in detail."
MANIFEST = "run.json"
MANIFEST_FORMAT = 1
MODES: tuple[str, ...] = tuple(_CONFIG_MODES)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One decoding setting: the baseline (``mode`` None) or KVSmooth in one mode.

    ``lambda_ref`` is λref for ``adaptive`` and ``keys`` and the constant λ for ``fixed``
    (SPEC §3: fixed uses λ = λref for every token).
    """

    mode: str | None = None
    lambda_ref: float | None = None

    def __post_init__(self) -> None:
        if self.mode is None:
            if self.lambda_ref is not None:
                raise EvalError("the baseline takes no λ")
            return
        if self.mode not in MODES:
            raise EvalError(f"unknown KVSmooth mode {self.mode!r}; expected one of {MODES}")
        if self.lambda_ref is None or not 0.0 <= self.lambda_ref <= 1.0:
            raise EvalError(f"{self.mode} needs a λ in [0, 1], not {self.lambda_ref}")

    @classmethod
    def parse(cls, spec: str) -> Setting:
        """``baseline``, or ``MODE:λ`` (``adaptive:0.9``, ``fixed:0.5``, ``keys:0.9``)."""
        if spec == "baseline":
            return cls()
        mode, sep, value = spec.partition(":")
        if not sep:
            raise EvalError(f"setting {spec!r}: expected 'baseline' or MODE:λ, e.g. adaptive:0.9")
        try:
            lam = float(value)
        except ValueError:
            raise EvalError(f"setting {spec!r}: {value!r} is not a number") from None
        return cls(mode=mode, lambda_ref=lam)

    @property
    def name(self) -> str:
        """File-name-safe identifier, e.g. ``adaptive-0.9``."""
        return "baseline" if self.mode is None else f"{self.mode}-{self.lambda_ref:g}"

    @property
    def label(self) -> str:
        """Row label in the report, in the paper's words."""
        if self.mode is None:
            return "Baseline"
        if self.mode == "adaptive":
            return f"KVSmooth (λref = {self.lambda_ref:g})"
        if self.mode == "fixed":
            return f"KVSmooth w/o Ada. (λ = {self.lambda_ref:g})"
        return f"KVSmooth, keys only (λref = {self.lambda_ref:g})"

    @classmethod
    def from_name(cls, name: str) -> Setting:
        if name == "baseline":
            return cls()
        mode, _, value = name.partition("-")
        return cls.parse(f"{mode}:{value}")


@dataclasses.dataclass(frozen=True)
class KVSmoothParams:
    """Parameters shared by every KVSmooth setting; None leaves the binding's default."""

    window: float | None = None
    queue: int | None = None
    layer_start: int | None = None
    layer_end: int | None = None

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    model: Path
    mmproj: Path
    images_dir: Path
    instances: Path
    out_dir: Path
    captions: Path | None = None  # only recorded, for `report`
    settings: tuple[Setting, ...] = (Setting(), Setting("adaptive", DEFAULT_LAMBDA_REF))
    n_images: int = 500
    seed: int = 0
    prompt: str = PROMPT
    max_tokens: int = 512
    n_ctx: int = 2048
    n_gpu_layers: int = -1
    flash_attn: bool = False
    kvsmooth: KVSmoothParams = KVSmoothParams()
    verbose: bool = False


class Captioner(Protocol):
    def caption(self, image: bytes, mime: str) -> tuple[str, int]:
        """The caption of one image and the number of tokens generated."""

    def describe(self) -> dict[str, Any]:
        """The effective KVSmooth configuration, for the manifest."""

    def close(self) -> None: ...


CaptionerFactory = Callable[[Setting, GenerateOptions], Captioner]


class LlamaCaptioner:
    """Captions with ``pykvsmooth.Llama`` and llama-cpp-python's LLaVA-1.5 chat handler."""

    def __init__(self, setting: Setting, options: GenerateOptions) -> None:
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        import pykvsmooth  # sets the library paths before llama_cpp is imported

        self._config = None
        if setting.mode is not None:
            self._config = pykvsmooth.KVSmoothConfig(
                lambda_ref=setting.lambda_ref, mode=setting.mode, **options.kvsmooth.overrides()
            )
        handler = Llava15ChatHandler(clip_model_path=str(options.mmproj), verbose=options.verbose)
        self._llm = pykvsmooth.Llama(
            model_path=str(options.model),
            chat_handler=handler,
            n_ctx=options.n_ctx,
            n_gpu_layers=options.n_gpu_layers,
            flash_attn=options.flash_attn,
            seed=options.seed,
            verbose=options.verbose,
            kvsmooth=self._config,
        )
        self._prompt = options.prompt
        self._max_tokens = options.max_tokens

    def caption(self, image: bytes, mime: str) -> tuple[str, int]:
        answer = self._llm.describe_image(image, self._prompt, mime=mime, max_tokens=self._max_tokens)
        return answer.text, answer.completion_tokens

    def describe(self) -> dict[str, Any]:
        return {} if self._config is None else self._config.as_dict()

    def close(self) -> None:
        self._llm.close()


def file_digest(path: Path) -> dict[str, Any]:
    """Name, size and SHA-256 of a file, to tell later which file produced the captions."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    return {
        "file": path.name,
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": h.hexdigest(),
    }


def _mime(path: Path) -> str:
    return "image/png" if path.suffix.lower() == ".png" else "image/jpeg"


def _setting_entry(setting: Setting, options: GenerateOptions) -> dict[str, Any]:
    """What the manifest must agree on to continue a setting's caption file."""
    entry: dict[str, Any] = {"mode": setting.mode, "lambda_ref": setting.lambda_ref}
    if setting.mode is not None:
        entry.update(dataclasses.asdict(options.kvsmooth))
    entry["file"] = f"{setting.name}.jsonl"
    return entry


def _check_same(what: str, recorded: Any, now: Any, manifest: Path) -> None:
    if recorded != now:
        raise EvalError(
            f"{manifest}: this run's {what} differs from the recorded one "
            f"({recorded!r} != {now!r}); use another output folder"
        )


def prepare_manifest(options: GenerateOptions) -> dict[str, Any]:
    """Create ``run.json``, or check that an existing one describes the same run.

    Returns the manifest, with the image ids to caption and the new settings added.
    """
    path = options.out_dir / MANIFEST
    model = file_digest(options.model)
    mmproj = file_digest(options.mmproj)
    settings = {s.name: _setting_entry(s, options) for s in options.settings}

    manifest: dict[str, Any]
    if path.exists():
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        _check_same("manifest format", manifest.get("format"), MANIFEST_FORMAT, path)
        _check_same("model", manifest["model"]["sha256"], model["sha256"], path)
        _check_same("mmproj", manifest["mmproj"]["sha256"], mmproj["sha256"], path)
        _check_same("number of images", manifest["images"]["n"], options.n_images, path)
        _check_same("sampling seed", manifest["images"]["seed"], options.seed, path)
        _check_same("prompt", manifest["generation"]["prompt"], options.prompt, path)
        _check_same("max_tokens", manifest["generation"]["max_tokens"], options.max_tokens, path)
        for name, entry in settings.items():
            if name in manifest["settings"]:
                recorded = dict(manifest["settings"][name])
                recorded.pop("effective", None)
                _check_same(f"setting {name}", recorded, entry, path)
            else:
                manifest["settings"][name] = entry
    else:
        annotations = load_annotations(options.instances)
        on_disk = set(os.listdir(options.images_dir)) if options.images_dir.is_dir() else set()
        if not on_disk:
            raise EvalError(f"{options.images_dir}: not a folder with images")
        candidates = [i for i, im in annotations.images.items() if im.file_name in on_disk]
        ids = sample_image_ids(candidates, options.n_images, options.seed)
        manifest = {
            "format": MANIFEST_FORMAT,
            "tool": "pykvsmooth.eval generate",
            "model": model,
            "mmproj": mmproj,
            "annotations": {
                "instances": str(options.instances.resolve()),
                "captions": str(options.captions.resolve()) if options.captions else None,
            },
            "images": {
                "folder": str(options.images_dir.resolve()),
                "n": options.n_images,
                "seed": options.seed,
                "ids": ids,
                "files": {str(i): annotations.images[i].file_name for i in ids},
            },
            "generation": {
                "prompt": options.prompt,
                "max_tokens": options.max_tokens,
                "decoding": "greedy",
                "n_ctx": options.n_ctx,
                "n_gpu_layers": options.n_gpu_layers,
                "flash_attn": options.flash_attn,
            },
            "settings": settings,
        }
    write_manifest(path, manifest)
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def done_image_ids(path: Path) -> set[int]:
    """Image ids already captioned in a settings file.

    A run killed while writing leaves a partial last line; it is cut off here, so that
    the image is captioned again.
    """
    if not path.exists():
        return set()
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    done = set()
    for line in complete:
        if line.strip():
            done.add(int(json.loads(line)["image_id"]))
    if tail.strip():
        with open(path, "wb") as f:
            f.write(b"\n".join(complete) + b"\n" if complete else b"")
    return done


def _progress(items: Sequence[int], desc: str) -> Iterator[int]:
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=desc, unit="image")
        return
    total = len(items)
    for k, item in enumerate(items, start=1):
        yield item
        print(f"{desc}: {k}/{total}", file=sys.stderr, flush=True)


def run(options: GenerateOptions, factory: CaptionerFactory = LlamaCaptioner) -> Path:
    """Caption every sampled image under every setting; returns the manifest's path."""
    if not options.settings:
        raise EvalError("no settings to run")
    names = [s.name for s in options.settings]
    if len(set(names)) != len(names):
        raise EvalError(f"settings repeat: {names}")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = prepare_manifest(options)
    manifest_path = options.out_dir / MANIFEST
    ids: list[int] = manifest["images"]["ids"]
    files: dict[str, str] = manifest["images"]["files"]

    for setting in options.settings:
        out = options.out_dir / f"{setting.name}.jsonl"
        done = done_image_ids(out)
        todo = [i for i in ids if i not in done]
        if not todo:
            print(f"{setting.name}: all {len(ids)} images done", file=sys.stderr)
            continue
        captioner = factory(setting, options)
        try:
            manifest["settings"][setting.name]["effective"] = captioner.describe()
            write_manifest(manifest_path, manifest)
            with open(out, "a", encoding="utf-8") as f:
                for image_id in _progress(todo, setting.name):
                    image_path = options.images_dir / files[str(image_id)]
                    try:
                        image = image_path.read_bytes()
                    except FileNotFoundError:
                        raise EvalError(f"{image_path}: no such file") from None
                    start = time.perf_counter()
                    text, n_tokens = captioner.caption(image, _mime(image_path))
                    record = {
                        "image_id": image_id,
                        "caption": text,
                        "setting": setting.name,
                        "n_tokens": n_tokens,
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
        finally:
            captioner.close()
    return manifest_path


def load_manifest(run_dir: PathLike) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            manifest: dict[str, Any] = json.load(f)
            return manifest
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file; is {run_dir} a `generate` output folder?") from None


def settings_in(manifest: dict[str, Any]) -> Iterable[Setting]:
    for name in manifest["settings"]:
        yield Setting.from_name(name)
