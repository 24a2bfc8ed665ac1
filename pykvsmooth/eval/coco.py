"""COCO annotations, the seeded image sample, and the caption files the tools exchange.

Only the parts of the COCO 2014 annotation files the evaluation needs are kept: for each
image its file name, the category names of its instance annotations, and its reference
captions.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]


class EvalError(Exception):
    """A problem with the user's input files or options; reported without a traceback."""


@dataclasses.dataclass(frozen=True)
class CocoImage:
    image_id: int
    file_name: str
    instance_objects: frozenset[str]  # category names of its instance annotations
    reference_captions: tuple[str, ...]  # empty when no captions file was loaded
    # the same names in the order of their first annotation in the file (POPE/HALC's
    # segmentation lists take the objects in this order)
    instance_order: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CocoAnnotations:
    images: dict[int, CocoImage]
    categories: tuple[str, ...]  # every category name of the instances file, by id

    def image(self, image_id: int) -> CocoImage:
        try:
            return self.images[image_id]
        except KeyError:
            raise EvalError(f"image_id {image_id} is not in the annotation files") from None


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    image_id: int
    caption: str


def _read_json(path: PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EvalError(f"{path}: expected a JSON object at the top level")
    return data


def load_annotations(
    instances_path: PathLike, captions_path: PathLike | None = None
) -> CocoAnnotations:
    """Read ``instances_*.json`` and, optionally, ``captions_*.json`` of one COCO split.

    The images are those of the instances file, in its order (images without any instance
    annotation are kept, with no instance objects).
    """
    instances = _read_json(instances_path)
    try:
        category_names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
        image_files = {int(im["id"]): str(im["file_name"]) for im in instances["images"]}
        # image -> category names, first-seen order (a dict used as an ordered set)
        objects: dict[int, dict[str, None]] = {image_id: {} for image_id in image_files}
        for ann in instances["annotations"]:
            objects[int(ann["image_id"])][category_names[int(ann["category_id"])]] = None
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{instances_path}: not a COCO instances file ({e!r})") from None

    references: dict[int, list[str]] = {image_id: [] for image_id in image_files}
    if captions_path is not None:
        captions = _read_json(captions_path)
        try:
            for ann in captions["annotations"]:
                image_id = int(ann["image_id"])
                # captions of images that the instances file does not list are ignored
                if image_id in references:
                    references[image_id].append(str(ann["caption"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EvalError(f"{captions_path}: not a COCO captions file ({e!r})") from None

    images = {
        image_id: CocoImage(
            image_id=image_id,
            file_name=file_name,
            instance_objects=frozenset(objects[image_id]),
            reference_captions=tuple(references[image_id]),
            instance_order=tuple(objects[image_id]),
        )
        for image_id, file_name in image_files.items()
    }
    ordered = tuple(category_names[k] for k in sorted(category_names))
    return CocoAnnotations(images=images, categories=ordered)


def sample_image_ids(candidates: Iterable[int], n: int, seed: int) -> list[int]:
    """``n`` distinct ids drawn with ``random.Random(seed)`` from the sorted candidates.

    Sorting first makes the sample depend only on the set of candidates and the seed,
    not on the order of the annotation file or of a directory listing. The result keeps
    the drawing order (the order images are captioned in).
    """
    pool = sorted(set(candidates))
    if n <= 0:
        raise EvalError(f"the number of images must be positive, not {n}")
    if n > len(pool):
        raise EvalError(f"cannot sample {n} images: only {len(pool)} are available")
    return random.Random(seed).sample(pool, n)


def read_caption_records(path: PathLike) -> list[CaptionRecord]:
    """Read a JSON lines file of ``{"image_id": int, "caption": str, ...}`` records.

    Other keys are ignored. Blank lines are skipped. An image may appear once only: a
    caption file holds one setting's captions, and a repeated image usually means two
    runs were appended to the same file.
    """
    records: list[CaptionRecord] = []
    seen: set[int] = set()
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                image_id = int(obj["image_id"])
                caption = obj["caption"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EvalError(
                    f"{path}:{lineno}: expected a JSON object with image_id and caption ({e!r})"
                ) from None
            if not isinstance(caption, str):
                raise EvalError(f"{path}:{lineno}: caption must be a string")
            if image_id in seen:
                raise EvalError(f"{path}:{lineno}: image_id {image_id} appears twice")
            seen.add(image_id)
            records.append(CaptionRecord(image_id=image_id, caption=caption))
    return records


def captions_by_image(records: Sequence[CaptionRecord]) -> dict[int, str]:
    return {r.image_id: r.caption for r in records}
