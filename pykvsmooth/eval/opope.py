"""OPOPE: POPE's object probes answered offline from captions (HALC, Chen et al. 2024).

This module holds what both protocols share (the metrics, the JSON report) and the
``extended`` protocol; :mod:`.halc` is the ``halc`` protocol, HALC's own rules, which the
paper's Table 2 numbers come from.

POPE (Li et al., 2023) asks a model "Is there a <object> in the image?" for objects that
are present (positives) and absent (negatives). OPOPE keeps POPE's probe sets and, instead
of asking, reads the answer from the model's caption of the image: "yes" iff the caption
mentions the object. The ``extended`` protocol follows HALC's ``eval/opope_eval.py`` in:

- ground truth of an image: its instance labels (POPE builds its probes from the
  segmentation annotations, not from the reference captions);
- images with fewer than ``num_samples`` (3) ground-truth objects are not probed;
- per image, ``num_samples`` positives, and for each positive one negative that is
  neither in the image nor already probed for it:
  *random*: uniformly from the objects of the probed images;
  *popular*: the most frequent object (number of probed images containing it);
  *adversarial*: the object that co-occurs most often with that positive;
  when popular / adversarial run out of candidates, a random one is taken (as HALC);
- metrics over all probes of a set: accuracy, precision, recall and
  F_β = (1 + β²)·P·R / (β²·P + R) with β = 0.2 (precision weighted, as in HALC and the
  KVSmooth paper); the paper reports the mean of each metric over the three sets.

and departs from it (``--protocol halc`` does exactly what HALC does) in:

- HALC takes the first objects of each image's list as positives and draws random
  negatives from one global random stream; here positives and random negatives are drawn
  per image from ``random.Random(f"{seed}:{image_id}:...")``, so one image's probes do not
  depend on which other images are in the caption file;
- HALC answers "yes" when any word of the object name is a substring of the caption
  ("car" in "carrot"); here an object is mentioned iff the extended CHAIR extractor finds
  it (with synonyms and plurals);
- frequency and co-occurrence are counted over the probed images (as HALC), ties broken by
  name.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Mapping, Sequence

from .chair import ObjectExtractor
from .coco import CaptionRecord, CocoAnnotations, EvalError

STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
DEFAULT_BETA = 0.2
DEFAULT_NUM_SAMPLES = 3


@dataclasses.dataclass(frozen=True)
class Probe:
    image_id: int
    category: str
    present: bool  # the label: is the object in the image


@dataclasses.dataclass(frozen=True)
class OpopeResult:
    """One probe set's scores; the rates are fractions in [0, 1]."""

    accuracy: float
    precision: float
    recall: float
    f_beta: float
    tp: int
    fp: int
    tn: int
    fn: int
    n_images: int  # images probed

    @property
    def f1(self) -> float:
        return f_beta(self.precision, self.recall, 1.0)

    @property
    def n_questions(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_percent(self) -> dict[str, float]:
        return {
            "accuracy": round(100.0 * self.accuracy, 4),
            "precision": round(100.0 * self.precision, 4),
            "recall": round(100.0 * self.recall, 4),
            "F_beta": round(100.0 * self.f_beta, 4),
            "F1": round(100.0 * self.f1, 4),
            "TP": self.tp,
            "FP": self.fp,
            "TN": self.tn,
            "FN": self.fn,
            "n_questions": self.n_questions,
            "n_images": self.n_images,
        }


def confusion_result(
    answers: Sequence[tuple[bool, bool]], beta: float, n_images: int
) -> OpopeResult:
    """Metrics from (answered yes, label yes) pairs, as HALC's ``print_acc`` counts them."""
    if not answers:
        raise EvalError("no OPOPE probes: no captioned image has enough ground-truth objects")
    tp = sum(1 for yes, present in answers if yes and present)
    fp = sum(1 for yes, present in answers if yes and not present)
    fn = sum(1 for yes, present in answers if not yes and present)
    tn = len(answers) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return OpopeResult(
        accuracy=(tp + tn) / len(answers),
        precision=precision,
        recall=recall,
        f_beta=f_beta(precision, recall, beta),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        n_images=n_images,
    )


def _rng(seed: int, image_id: int, purpose: str) -> random.Random:
    # str seeds are hashed with SHA-512, so this is the same in every process
    return random.Random(f"{seed}:{image_id}:{purpose}")


def build_probes(
    ground_truth: Mapping[int, frozenset[str]],
    strategy: str,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
) -> list[Probe]:
    """POPE probes for the images of ``ground_truth`` that have enough objects.

    Images are taken in id order; the probes of one image are positive, negative,
    positive, negative, ... with the positives in name order, each negative sampled for
    the positive before it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown OPOPE strategy {strategy!r}; expected one of {STRATEGIES}")
    if num_samples <= 0:
        raise EvalError(f"num_samples must be positive, not {num_samples}")
    images = {i: objs for i, objs in ground_truth.items() if len(objs) >= num_samples}

    frequency: Counter[str] = Counter()
    co_occurrence: dict[str, Counter[str]] = {}
    for objs in images.values():
        frequency.update(objs)
        for a in objs:
            co_occurrence.setdefault(a, Counter()).update(b for b in objs if b != a)
    pool = sorted(frequency)
    by_popularity = sorted(pool, key=lambda o: (-frequency[o], o))

    probes: list[Probe] = []
    for image_id in sorted(images):
        objs = images[image_id]
        # which positives is random; their order (and so which negative each gets) is not
        positives = sorted(_rng(seed, image_id, "positive").sample(sorted(objs), num_samples))
        random_rng = _rng(seed, image_id, strategy)
        used = set()
        for positive in positives:
            used.add(positive)
            if strategy == "popular":
                ranked: Sequence[str] = by_popularity
            elif strategy == "adversarial":
                counts = co_occurrence.get(positive, Counter())
                ranked = sorted(counts, key=lambda o: (-counts[o], o))
            else:
                ranked = ()
            negative = next((o for o in ranked if o not in objs and o not in used), None)
            if negative is None:
                allowed = [o for o in pool if o not in objs and o not in used]
                if not allowed:
                    raise EvalError(
                        f"image {image_id}: no object left to use as a negative; the "
                        "caption file covers too few images"
                    )
                negative = random_rng.choice(allowed)
            used.add(negative)
            probes.append(Probe(image_id, positive, True))
            probes.append(Probe(image_id, negative, False))
    return probes


def f_beta(precision: float, recall: float, beta: float = DEFAULT_BETA) -> float:
    b2 = beta * beta
    den = b2 * precision + recall
    return (1.0 + b2) * precision * recall / den if den else 0.0


def score_probes(
    probes: Sequence[Probe],
    answers: Mapping[int, frozenset[str]],
    beta: float = DEFAULT_BETA,
) -> OpopeResult:
    """Score probes; ``answers`` maps an image to the objects its caption mentions."""
    if not probes:
        raise EvalError("no OPOPE probes: no captioned image has enough ground-truth objects")
    pairs = [(p.category in answers[p.image_id], p.present) for p in probes]
    return confusion_result(pairs, beta, n_images=len({p.image_id for p in probes}))


def evaluate_opope(
    records: Sequence[CaptionRecord],
    annotations: CocoAnnotations,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    beta: float = DEFAULT_BETA,
    extractor: ObjectExtractor | None = None,
) -> dict[str, OpopeResult]:
    """OPOPE on the captioned images: one result per strategy (see the module doc)."""
    extractor = extractor or ObjectExtractor()
    ground_truth = {
        r.image_id: annotations.image(r.image_id).instance_objects for r in records
    }
    answers = {r.image_id: extractor.objects(r.caption) for r in records}
    return {
        strategy: score_probes(
            build_probes(ground_truth, strategy, num_samples, seed), answers, beta
        )
        for strategy in STRATEGIES
    }


def average(results: Mapping[str, OpopeResult]) -> dict[str, float]:
    """The paper's number: each metric's mean over the probe sets, in percent."""
    n = len(results)
    return {
        "accuracy": round(100.0 * sum(r.accuracy for r in results.values()) / n, 4),
        "precision": round(100.0 * sum(r.precision for r in results.values()) / n, 4),
        "recall": round(100.0 * sum(r.recall for r in results.values()) / n, 4),
        "F_beta": round(100.0 * sum(r.f_beta for r in results.values()) / n, 4),
    }


def opope_report(results: Mapping[str, OpopeResult]) -> dict[str, object]:
    """The JSON ``kvsmooth-eval opope`` prints: the means over the splits (``accuracy``,
    ``precision``, ``recall``, ``F_beta``), then each split's numbers and counts."""
    out: dict[str, object] = dict(average(results))
    out.update({name: r.as_percent() for name, r in results.items()})
    return out
