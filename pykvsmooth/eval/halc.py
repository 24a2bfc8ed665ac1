"""OPOPE as HALC scores it (``--protocol halc``): the paper's Table 2 protocol.

HALC's ``eval/opope_eval.py`` (BillChan226/HALC @12ea8b5) builds POPE's probes from the
ground-truth segmentation lists of the captioned images and answers each probe from the
caption, without asking the model:

- **answer** (its ``recorder``): "yes" iff any space-separated word of the object's name is
  a substring of the raw caption, case-sensitive, without tokenising. So "cat" is yes for
  "catcher", "car" for "carries", "dining table" for any "table", both baseball objects for
  "baseball"; "person" is no for "man", "tv" no for "TV" or "television";
- **probes** (POPE's ``pope()``): the captioned images with at least ``num_samples`` (3)
  ground-truth objects, in the segmentation file's order; positives are the first three
  objects of each list; after each positive one negative that is neither in the image nor
  asked before for it:
  *random*: ``random.choice`` over the objects in first-seen order, drawn again while it is
  not allowed, from one stream seeded once per split (HALC runs one split per process,
  seeding Python's ``random`` with ``--seed``, default 0);
  *popular*: the most frequent object (images whose list has it), ties in first-seen order;
  *adversarial*: the object co-occurring most often with that positive, ties in first-seen
  order; popular and adversarial fall back to the random draw when nothing is left;
- **POPE's question files** (``--questions``): instead of building probes, POPE's own
  ``coco_pope_{random,popular,adversarial}.json``; the object is the X of "Is there a/an X
  in the image?", the label is the file's;
- **metrics** per split, from TP/FP/TN/FN: accuracy, precision, recall, F1 (what HALC's
  code prints) and F_β = (1 + β²)PR / (β²P + R) with β = 0.2 (HALC's paper and the KVSmooth
  paper, which report each metric's mean over the three splits).

Without HALC's segmentation file (``pope_coco/coco_ground_truth_segmentation.json``, one
``{"image": ..., "objects": [...]}`` per line: ``--segmentation``) the lists come from the
COCO instances file: images in its order, each image's categories in the order of their
first annotation.

Where HALC's code would fail or hang, this module raises an error instead: a caption
missing for a probed image, or no object left to be a negative.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .coco import CaptionRecord, CocoAnnotations, EvalError, PathLike
from .opope import (
    DEFAULT_BETA,
    DEFAULT_NUM_SAMPLES,
    STRATEGIES,
    OpopeResult,
    confusion_result,
)

_QUESTION = re.compile(r"^\s*Is there an? (.+?) in the image\?\s*$")
_IMAGE_ID = re.compile(r"(\d+)\.\w+$")


@dataclasses.dataclass(frozen=True)
class Question:
    image_id: int
    object: str
    label: bool  # True: "yes", the object is in the image


@dataclasses.dataclass(frozen=True)
class Segment:
    """One line of POPE's ground-truth segmentation file: an image and its objects, in order."""

    image_id: int
    objects: tuple[str, ...]


def says_yes(caption: str, object_name: str) -> bool:
    """HALC's ``recorder``: any word of the object's name occurs in the caption."""
    return any(word in caption for word in object_name.split(" "))


def image_id_of(file_name: str) -> int:
    """The COCO id in an image name, ``COCO_val2014_000000310196.jpg`` -> 310196."""
    match = _IMAGE_ID.search(file_name.rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"no image id in {file_name!r}")
    return int(match.group(1))


def segments_from_annotations(
    annotations: CocoAnnotations, image_ids: Sequence[int]
) -> list[Segment]:
    """The segmentation lists of ``image_ids`` from COCO instances, in the file's image order."""
    wanted = set(image_ids)
    for image_id in wanted:
        annotations.image(image_id)  # an unknown image is an error, not a silent skip
    return [
        Segment(image_id, image.instance_order)
        for image_id, image in annotations.images.items()
        if image_id in wanted
    ]


def read_segmentation(path: PathLike, image_ids: Sequence[int]) -> list[Segment]:
    """HALC/POPE's segmentation JSON lines, cut to ``image_ids`` (kept in file order)."""
    wanted = set(image_ids)
    segments = []
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
                if "image_id" in obj:
                    image_id = int(obj["image_id"])
                else:
                    image_id = image_id_of(str(obj["image"]))
                objects = tuple(str(o) for o in obj["objects"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EvalError(
                    f"{path}:{lineno}: expected a JSON object with image and objects ({e!r})"
                ) from None
            if image_id in wanted:
                segments.append(Segment(image_id, objects))
    missing = wanted - {s.image_id for s in segments}
    if missing:
        raise EvalError(
            f"{path}: {len(missing)} captioned images are not in the segmentation file "
            f"(e.g. {min(missing)})"
        )
    return segments


def _ranked(counts: Mapping[str, int]) -> list[str]:
    # Python's sort is stable, also with reverse=True: ties keep first-seen order (as HALC)
    return [name for name, _ in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]


def build_questions(
    segments: Sequence[Segment],
    strategy: str,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
) -> list[Question]:
    """POPE's probes for one split, drawn exactly as HALC draws them."""
    if strategy not in STRATEGIES:
        raise EvalError(f"unknown OPOPE split {strategy!r}; expected one of {STRATEGIES}")
    if num_samples <= 0:
        raise EvalError(f"num_samples must be positive, not {num_samples}")
    probed = [s for s in segments if len(s.objects) >= num_samples]
    frequency: dict[str, int] = {}
    co_occurrence: dict[str, dict[str, int]] = {}
    for s in probed:
        for o in s.objects:
            frequency[o] = frequency.get(o, 0) + 1
            row = co_occurrence.setdefault(o, {})
            for other in s.objects:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    pool = list(frequency)
    by_popularity = _ranked(frequency)
    by_co_occurrence = {o: _ranked(row) for o, row in co_occurrence.items()}
    rng = random.Random(seed)

    questions: list[Question] = []
    for s in probed:
        history: list[str] = []
        for positive in s.objects[:num_samples]:
            history.append(positive)
            questions.append(Question(s.image_id, positive, True))
            if strategy == "popular":
                ranked: Sequence[str] = by_popularity
            elif strategy == "adversarial":
                ranked = by_co_occurrence[positive]
            else:
                ranked = ()
            negative = next((o for o in ranked if o not in history and o not in s.objects), None)
            if negative is None:
                if not any(o not in history and o not in s.objects for o in pool):
                    raise EvalError(
                        f"image {s.image_id}: no object left to use as a negative; the "
                        "caption file covers too few images"
                    )
                negative = rng.choice(pool)
                while negative in history or negative in s.objects:
                    negative = rng.choice(pool)
            history.append(negative)
            questions.append(Question(s.image_id, negative, False))
    return questions


def read_pope_questions(path: PathLike) -> list[Question]:
    """One of POPE's question files (JSON lines of question_id, image, text, label)."""
    questions = []
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
                image_id = image_id_of(str(obj["image"]))
                text, label = str(obj["text"]), str(obj["label"]).strip().lower()
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EvalError(
                    f"{path}:{lineno}: expected a POPE question (image, text, label) ({e!r})"
                ) from None
            match = _QUESTION.match(text)
            if match is None:
                raise EvalError(
                    f"{path}:{lineno}: {text!r} is not 'Is there a/an X in the image?'"
                )
            if label not in ("yes", "no"):
                raise EvalError(f"{path}:{lineno}: label must be yes or no, not {label!r}")
            questions.append(Question(image_id, match.group(1), label == "yes"))
    if not questions:
        raise EvalError(f"{path}: no questions")
    return questions


def score_questions(
    questions: Sequence[Question], captions: Mapping[int, str], beta: float = DEFAULT_BETA
) -> OpopeResult:
    missing = {q.image_id for q in questions} - set(captions)
    if missing:
        raise EvalError(
            f"{len(missing)} probed images have no caption (e.g. image_id {min(missing)}); "
            "caption the question files' images"
        )
    pairs = [(says_yes(captions[q.image_id], q.object), q.label) for q in questions]
    return confusion_result(pairs, beta, n_images=len({q.image_id for q in questions}))


def evaluate_halc(
    records: Sequence[CaptionRecord],
    annotations: CocoAnnotations | None = None,
    questions: Sequence[PathLike] | None = None,
    segmentation: PathLike | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    beta: float = DEFAULT_BETA,
) -> dict[str, OpopeResult]:
    """OPOPE with HALC's rules: one result per split (random, popular, adversarial).

    ``questions``: POPE's three files, in that order; otherwise the probes are built from
    ``segmentation`` (HALC's file) or, without it, from ``annotations``.
    """
    captions = {r.image_id: r.caption for r in records}
    if questions is not None:
        if len(questions) != len(STRATEGIES):
            raise EvalError(
                "--questions takes POPE's three files, in this order: RANDOM POPULAR ADVERSARIAL"
            )
        return {
            split: score_questions(read_pope_questions(Path(path)), captions, beta)
            for split, path in zip(STRATEGIES, questions)
        }
    ids = [r.image_id for r in records]
    if segmentation is not None:
        segments = read_segmentation(segmentation, ids)
    elif annotations is not None:
        segments = segments_from_annotations(annotations, ids)
    else:
        raise EvalError("give --instances (or --segmentation, or POPE's --questions)")
    return {
        split: score_questions(build_questions(segments, split, num_samples, seed), captions, beta)
        for split in STRATEGIES
    }
