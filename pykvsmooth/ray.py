"""Captioning with Ray Data: one model per actor, as many actors as the cluster holds.

    import ray, ray.data
    from pykvsmooth.ray import caption_dataset

    ds = ray.data.read_parquet("manifest.parquet")          # a "path" or an "image" (bytes) column
    out = caption_dataset(ds, model="m.gguf", mmproj="p.gguf", kvsmooth=0.9,
                          concurrency=4, num_gpus=1, batch_size=8)
    out.write_parquet("captions/")                          # + caption, error, ... columns

or straight ``ds.map_batches(Captioner, fn_constructor_kwargs={...}, compute=...,
num_gpus=1, batch_format="pyarrow")``. Each row gets ``caption`` (with the prefix and suffix)
and ``error`` (None, or why the image could not be captioned: a corrupt image is a row with
an error, not a failed job), ``prompt``, ``kvsmooth`` (the setting as JSON, ``null`` when
off), ``prompt_tokens``, ``completion_tokens`` and ``seconds``; an ``image`` bytes column
is dropped from the output. The captions are those of ``kvsmooth-caption`` with the same
settings (the same code makes them).

``kvsmooth-caption ... --ray [ADDRESS]`` is the command-line front end (``run_cli``). Needs
the ``ray`` extra: ``pip install 'pykvsmooth[ray]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

from . import caption as _caption
from .config import DEFAULT_LAMBDA_REF, KVSmoothConfig, KVSmoothValue

OUTPUT_COLUMNS = ("caption", "error", "prompt", "kvsmooth", "prompt_tokens", "completion_tokens", "seconds")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("pykvsmooth.ray needs Ray Data: pip install 'pykvsmooth[ray]'") from None
    return ray


class Captioner:
    """A callable class for ``Dataset.map_batches``: loads one model in ``__init__`` (once
    per actor) and captions a batch's ``image`` bytes or ``path`` files.

    ``model``/``mmproj`` are paths that must exist on every node; or ``hf_repo``
    (``USER/MODEL[:QUANT]``, with ``hf_file``) has each actor take the files from its node's
    Hugging Face cache, downloading them there once. ``prompt`` is a template with
    kvsmooth-caption's variables; a ``prompt`` column, when the batch has one, is used as it
    is instead. ``kvsmooth`` is None/0 (off), λref, a mapping of KVSmoothConfig fields or a
    KVSmoothConfig; the other arguments are CaptionSettings'.
    """

    def __init__(self, model: Optional[str] = None, mmproj: Optional[str] = None, *,
                 hf_repo: Optional[str] = None, hf_file: Optional[str] = None, hf_revision: str = "main",
                 kvsmooth: KVSmoothValue = DEFAULT_LAMBDA_REF, **settings: Any) -> None:
        if hf_repo is not None:
            from . import hub

            got = hub.resolve(hf_repo, hf_file=hf_file, want_mmproj=mmproj is None, revision=hf_revision)
            model = str(got.model)
            mmproj = mmproj or str(got.mmproj)
        if model is None or mmproj is None:
            raise ValueError("Captioner needs model and mmproj paths, or hf_repo")
        self.kvsmooth = KVSmoothConfig.coerce(kvsmooth)
        # the setting every row was made with, as the JSONL records it (null: off)
        self._kvsmooth_json = json.dumps(None if self.kvsmooth is None else
                                         {k: v for k, v in self.kvsmooth.as_dict().items() if k != "trace"})
        self.settings = _caption.CaptionSettings(model=str(model), mmproj=str(mmproj), **settings).resolved()
        self._captioner = _caption.Captioner(self.settings, self.kvsmooth)

    def caption_one(self, image: Union[bytes, str, Path, None], path: Optional[str],
                    prompt: Optional[str]) -> Dict[str, Any]:
        """The output columns for one row."""
        if prompt is None:
            where = Path(path) if path else None
            prompt = _caption.render_prompt(self.settings.prompt, where,
                                            _caption.read_existing(where) if where else None)
        row: Dict[str, Any] = {"caption": None, "error": None, "prompt": prompt, "kvsmooth": self._kvsmooth_json,
                               "prompt_tokens": None, "completion_tokens": None, "seconds": None}
        try:
            if image is None and not path:
                raise ValueError("the row has neither an image nor a path")
            source: Union[bytes, Path] = (bytes(image) if isinstance(image, (bytes, bytearray, memoryview))
                                          else Path(str(image or path)))
            png, _ = _caption.load_image(source)
            row.update(self._captioner.caption(png, prompt, self.kvsmooth))
        except (ValueError, OSError) as e:  # unreadable image, or one the model could not take
            row["error"] = str(e)
        return row

    def __call__(self, batch: Any) -> Any:
        columns = _columns(batch)
        n = len(next(iter(columns.values()))) if columns else 0
        images = columns.get("image", [None] * n)
        paths = columns.get("path", [None] * n)
        prompts = columns.get("prompt", [None] * n)
        rows = [self.caption_one(images[i], None if paths[i] is None else str(paths[i]),
                                 None if prompts[i] is None else str(prompts[i])) for i in range(n)]
        out = {k: v for k, v in columns.items() if k != "image" and k not in OUTPUT_COLUMNS}
        for name in OUTPUT_COLUMNS:
            out[name] = [r[name] for r in rows]
        return _like(batch, out)


def _columns(batch: Any) -> Dict[str, List[Any]]:
    """A batch (pyarrow.Table, pandas.DataFrame or dict of arrays) as lists per column."""
    if hasattr(batch, "column_names") and hasattr(batch, "to_pydict"):  # pyarrow.Table
        return dict(cast(Dict[str, List[Any]], batch.to_pydict()))
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        return {str(k): list(v) for k, v in batch.to_dict(orient="list").items()}
    if isinstance(batch, Mapping):
        return {str(k): list(v) for k, v in batch.items()}
    raise TypeError(f"expected a pyarrow.Table, pandas.DataFrame or dict batch, got {type(batch).__name__}")


def _like(batch: Any, out: Dict[str, List[Any]]) -> Any:
    """``out`` in the batch's own format."""
    if hasattr(batch, "column_names") and hasattr(batch, "to_pydict"):
        import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

        types = {"caption": pa.string(), "error": pa.string(), "prompt": pa.string(), "kvsmooth": pa.string(),
                 "prompt_tokens": pa.int64(),
                 "completion_tokens": pa.int64(), "seconds": pa.float64()}
        return pa.table({k: pa.array(v, type=types.get(k)) for k, v in out.items()})
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        import pandas as pd  # type: ignore[import-untyped, unused-ignore]

        return pd.DataFrame(out)
    import numpy as np

    return {k: np.array(v, dtype=object) if k in OUTPUT_COLUMNS else np.array(v) for k, v in out.items()}


def caption_dataset(ds: Any, model: Optional[str] = None, mmproj: Optional[str] = None, *,
                    concurrency: Union[int, Tuple[int, int]] = 1, num_gpus: Optional[float] = None,
                    num_cpus: Optional[float] = None, batch_size: int = 8, **captioner: Any) -> Any:
    """``ds.map_batches(Captioner, ...)`` on an actor pool of ``concurrency`` actors (an
    int, or (min, max) to autoscale), each holding ``num_gpus`` GPUs and ``num_cpus`` CPUs."""
    ray = _import_ray()
    size = dict(size=concurrency) if isinstance(concurrency, int) else dict(min_size=concurrency[0],
                                                                             max_size=concurrency[1])
    return ds.map_batches(
        Captioner, fn_constructor_kwargs=dict(model=model, mmproj=mmproj, **captioner),
        compute=ray.data.ActorPoolStrategy(**size), num_gpus=num_gpus, num_cpus=num_cpus,
        batch_size=batch_size, batch_format="pyarrow")


# --- kvsmooth-caption --ray -------------------------------------------------------------------


def _init(address: str, verbose: bool) -> Any:
    ray = _import_ray()
    # Ray's own notices (local instance started, token file, progress bars off) only with --verbose
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    ray.init(address=None if address == "local" else address, include_dashboard=False,
             logging_level=level, log_to_driver=verbose)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the tool draws its own
    if not verbose:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(level)
    return ray


def actor_layout(args: argparse.Namespace, resources: Mapping[str, float]) -> Tuple[int, float]:
    """(actors, GPUs per actor) from the options and the cluster's resources."""
    gpus = float(resources.get("GPU", 0))
    per_actor = args.ray_gpus if args.ray_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if args.ray_actors is not None:
        return args.ray_actors, per_actor
    return (max(1, int(gpus // per_actor)) if per_actor > 0 else 1), per_actor


def run_cli(args: argparse.Namespace, kvsmooth: Optional[KVSmoothConfig]) -> _caption.Summary:
    """``kvsmooth-caption --ray``: the same plan, records and sidecars as a run in one
    process, with the captions made by actors; rows already captioned are not sent."""
    settings = _caption.CaptionSettings.from_args(args).resolved()
    job = _caption.plan(args, settings, kvsmooth)
    summary = job.summary
    progress = _caption.Progress(len(job.todo), args.quiet)
    t_start = time.monotonic()
    existing: Dict[str, Optional[str]] = {}
    rows: List[Dict[str, str]] = []
    ray = None
    try:
        for image in job.todo:
            prompt, existing[str(image)] = job.prompt_for(image)
            if image in job.clashes:
                job.commit(image, {"path": str(image), "error": f"its sidecar {_caption.sidecar_path(image)} is "
                                   f"also the sidecar of {job.clashes[image]}"}, None, 0, progress)
            else:
                rows.append({"path": str(image), "prompt": prompt})
        if rows:
            ray = _init(args.ray, args.verbose)
            actors, gpus = actor_layout(args, ray.cluster_resources())
            ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), actors * 4)))
            out = caption_dataset(ds, kvsmooth=kvsmooth, concurrency=actors, num_gpus=gpus or None,
                                  num_cpus=args.ray_cpus, batch_size=args.ray_batch_size,
                                  **_actor_settings(args, settings))
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    image = Path(row["path"])
                    job.commit(image, _record(row, job.record_settings), existing.get(row["path"]),
                               row["completion_tokens"] or 0, progress)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.monotonic() - t_start
        progress.close()
        job.finish()
        if ray is not None:
            ray.shutdown()
    return summary


def _actor_settings(args: argparse.Namespace, settings: _caption.CaptionSettings) -> Dict[str, Any]:
    fields: Dict[str, Any] = {k: getattr(settings, k) for k in (
        "chat_format", "prompt", "prefix", "suffix", "max_tokens", "temperature", "seed", "n_ctx", "n_gpu_layers",
        "threads", "verbose")}
    got = getattr(args, "hub_model", None)
    if got is None:
        return dict(model=settings.model, mmproj=settings.mmproj, **fields)
    # a hub model: every node takes the same revision's files from its own cache (downloading once)
    return dict(hf_repo=got.repo, hf_file=got.model_file, hf_revision=got.revision,
                mmproj=None if got.mmproj is not None else settings.mmproj, **fields)


def _record(row: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    if row.get("error") is not None:
        return {"path": row["path"], "error": row["error"]}
    return {"path": row["path"], "caption": row["caption"], "prompt": row["prompt"], "settings": settings,
            "timings": {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
                        "seconds": row["seconds"]}}


__all__: Sequence[str] = ("Captioner", "caption_dataset", "run_cli", "actor_layout")
