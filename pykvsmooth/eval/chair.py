"""CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image Captioning").

Definitions, as in OPERA's ``chair.py`` (CHAIR_S, CHAIR_I, recall) and in the ``chair.py``
of PAI and MiddleLayer (precision, F1), the scorers behind the KVSmooth paper's Table 1, over
a set of generated captions, one per image:

- an object *mention* is an occurrence of a COCO object word in a caption (a caption that
  says "a man ... the man" mentions person twice);
- a mention is *hallucinated* when its object is not among the image's ground-truth
  objects: its instance labels plus the objects its reference captions mention;
- CHAIR_S = captions with at least one hallucinated mention / captions;
- CHAIR_I = hallucinated mentions / mentions;
- recall = Σ |distinct mentioned objects ∩ ground truth| / Σ |ground truth|;
- precision = Σ |distinct mentioned objects ∩ ground truth| / Σ |distinct mentioned
  objects| (PAI / MiddleLayer; not 1 − CHAIR_I, which counts repeats: that one is kept as
  ``mention_precision``);
- F1 = 2 · precision · recall / (precision + recall).

All sums run over the captions (pooled, not averaged per caption). Where the references
divide by zero (no mentions at all), the rate is 0 here.

Two extractors find the mentions: :class:`~pykvsmooth.eval.opera.OperaExtractor` (protocol
``opera``, the reference: NLTK lemmas and OPERA's synonym list, quirks included) and
:class:`ObjectExtractor` below (protocol ``extended``: no NLP model, a larger synonym table
with plurals by spelling rules).

:class:`ObjectExtractor` finds object words without any NLP model: the caption is
lower-cased, possessive "'s" is dropped, it is split into runs of letters, and the longest
phrase of the synonym table (singular or plural form) starting at each word wins, so "hot
dogs" is one hot dog and not a dog. Plurals are generated from the table by spelling rules
(:func:`pluralize`), so only the table's own words are ever singularized.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from . import synonyms
from .coco import CaptionRecord, CocoAnnotations, CocoImage, EvalError, PathLike

_POSSESSIVE = re.compile(r"['’]s\b")
_WORD = re.compile(r"[a-z]+")


def pluralize(word: str) -> str:
    """English plural of one word of the synonym table."""
    irregular = synonyms.IRREGULAR_PLURALS.get(word)
    if irregular is not None:
        return irregular
    if word.endswith("man"):
        return word[:-3] + "men"  # woman, policeman, fisherman, ...
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def pluralize_phrase(phrase: str) -> str:
    """Plural of a phrase: its last word takes the plural ("wine glasses")."""
    head, _, last = phrase.rpartition(" ")
    return f"{head} {pluralize(last)}" if head else pluralize(last)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(_POSSESSIVE.sub("", text.lower()))


@dataclasses.dataclass(frozen=True)
class Mention:
    words: str  # the words of the caption that named it, as written (lower case)
    category: str  # the COCO category
    index: int  # position of its first word among the caption's words


class Extractor(Protocol):
    """What CHAIR needs from an object extractor."""

    name: str  # the protocol it implements: "opera" or "extended"
    categories: tuple[str, ...]

    def mentions(self, text: str) -> list[Mention]:
        """Every object mention of ``text``, in order."""

    def objects(self, text: str) -> frozenset[str]:
        """The distinct objects ``text`` mentions."""

    def category_of(self, label: str) -> str | None:
        """The object an instance label (a COCO category name) stands for; None if none."""


class ObjectExtractor:
    """Finds the COCO objects a text mentions, with the tables in :mod:`.synonyms`."""

    name = "extended"

    def __init__(
        self,
        table: Mapping[str, Sequence[str]] = synonyms.COCO_SYNONYMS,
        qualifiers: Sequence[str] = synonyms.PERSON_QUALIFIERS,
        qualified: Sequence[str] = synonyms.QUALIFIED_CATEGORIES,
        non_objects: Sequence[str] = synonyms.NON_OBJECT_PHRASES,
        suppressed_by: Mapping[str, str] = synonyms.SUPPRESSED_BY,
    ) -> None:
        # phrase (singular or plural form) -> category, or None for a phrase that names
        # no object but must still be consumed as a whole
        phrases: dict[str, str | None] = {}

        def add(phrase: str, category: str | None) -> None:
            for form in (phrase, pluralize_phrase(phrase)):
                previous = phrases.setdefault(form, category)
                if previous != category:
                    raise ValueError(f"{form!r} names both {previous!r} and {category!r}")

        for category, names in table.items():
            for name in names:
                add(name, category)
        for category in qualified:
            for name in table[category]:
                for qualifier in qualifiers:
                    add(f"{qualifier} {name}", category)
        for phrase in non_objects:
            add(phrase, None)

        self.categories: tuple[str, ...] = tuple(table)
        self._categories = frozenset(table)
        self._phrases = phrases
        self._max_words = max(len(p.split()) for p in phrases)
        # the suppressed word in every form (seat, seats)
        self._suppressed_by = {
            form: category
            for word, category in suppressed_by.items()
            for form in (word, pluralize(word))
        }

    def mentions(self, text: str) -> list[Mention]:
        words = tokenize(text)
        found: list[Mention] = []
        i = 0
        while i < len(words):
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                phrase = " ".join(words[i : i + n])
                if phrase in self._phrases:
                    category = self._phrases[phrase]
                    if category is not None:
                        found.append(Mention(words=phrase, category=category, index=i))
                    i += n
                    break
            else:
                i += 1
        named = {m.category for m in found}
        return [
            m
            for m in found
            if self._suppressed_by.get(m.words) not in named
        ]

    def objects(self, text: str) -> frozenset[str]:
        return frozenset(m.category for m in self.mentions(text))

    def category_of(self, label: str) -> str | None:
        return label if label in self._categories else None


PROTOCOLS: tuple[str, ...] = ("opera", "extended")
DEFAULT_PROTOCOL = "opera"


def make_extractor(protocol: str = DEFAULT_PROTOCOL, nltk_data: PathLike | None = None) -> Extractor:
    """The extractor of a CHAIR protocol (``opera`` loads NLTK and its data)."""
    if protocol == "opera":
        from .opera import OperaExtractor

        return OperaExtractor(nltk_data=nltk_data)
    if protocol == "extended":
        return ObjectExtractor()
    raise EvalError(f"unknown CHAIR protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def ground_truth_objects(image: CocoImage, extractor: Extractor) -> frozenset[str]:
    """The image's instance labels plus every object its reference captions mention."""
    found = set()
    unknown = []
    for label in sorted(image.instance_objects):
        category = extractor.category_of(label)
        if category is None:
            unknown.append(label)
        else:
            found.add(category)
    if unknown:
        raise EvalError(
            f"image {image.image_id}: categories {unknown} are not COCO's 80"
        )
    for caption in image.reference_captions:
        found.update(extractor.objects(caption))
    return frozenset(found)


class GroundTruth:
    """Ground-truth objects per image, each image's computed once (reference captions are
    read with the extractor, which for ``opera`` costs an NLTK pass per caption)."""

    def __init__(self, annotations: CocoAnnotations, extractor: Extractor) -> None:
        self.annotations = annotations
        self.extractor = extractor
        self._cache: dict[int, frozenset[str]] = {}

    def __call__(self, image_id: int) -> frozenset[str]:
        if image_id not in self._cache:
            image = self.annotations.image(image_id)
            self._cache[image_id] = ground_truth_objects(image, self.extractor)
        return self._cache[image_id]


@dataclasses.dataclass(frozen=True)
class CaptionChair:
    """CHAIR's view of one caption."""

    image_id: int
    mentions: tuple[Mention, ...]
    hallucinated: tuple[Mention, ...]
    ground_truth: frozenset[str]
    covered: frozenset[str]  # ground-truth objects the caption mentions

    @property
    def generated(self) -> frozenset[str]:
        """The distinct objects the caption mentions."""
        return frozenset(m.category for m in self.mentions)


@dataclasses.dataclass(frozen=True)
class ChairResult:
    """Corpus-level CHAIR; the rates are fractions in [0, 1]."""

    chair_s: float
    chair_i: float
    precision: float  # covered / distinct generated objects (PAI, MiddleLayer)
    recall: float
    f1: float
    mention_precision: float  # 1 - CHAIR_I
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_hallucinated_captions: int
    n_ground_truth: int
    n_covered: int
    n_distinct_generated: int

    def as_percent(self) -> dict[str, float]:
        """What ``kvsmooth-eval chair`` prints: exactly the paper's five numbers, percent."""
        return {
            "CHAIR_S": round(100.0 * self.chair_s, 4),
            "CHAIR_I": round(100.0 * self.chair_i, 4),
            "recall": round(100.0 * self.recall, 4),
            "precision": round(100.0 * self.precision, 4),
            "F1": round(100.0 * self.f1, 4),
        }

    def counts(self) -> dict[str, int]:
        return {
            "n_captions": self.n_captions,
            "n_mentions": self.n_mentions,
            "n_hallucinated_mentions": self.n_hallucinated_mentions,
            "n_hallucinated_captions": self.n_hallucinated_captions,
            "n_ground_truth": self.n_ground_truth,
            "n_covered": self.n_covered,
            "n_distinct_generated": self.n_distinct_generated,
        }


def score_caption(
    image_id: int, caption: str, ground_truth: frozenset[str], extractor: Extractor
) -> CaptionChair:
    mentions = tuple(extractor.mentions(caption))
    hallucinated = tuple(m for m in mentions if m.category not in ground_truth)
    covered = frozenset(m.category for m in mentions if m.category in ground_truth)
    return CaptionChair(
        image_id=image_id,
        mentions=mentions,
        hallucinated=hallucinated,
        ground_truth=ground_truth,
        covered=covered,
    )


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def summarize(scores: Sequence[CaptionChair]) -> ChairResult:
    if not scores:
        raise EvalError("no captions to evaluate")
    n_mentions = sum(len(s.mentions) for s in scores)
    n_hall = sum(len(s.hallucinated) for s in scores)
    n_hall_caps = sum(1 for s in scores if s.hallucinated)
    n_gt = sum(len(s.ground_truth) for s in scores)
    n_cov = sum(len(s.covered) for s in scores)
    n_gen = sum(len(s.generated) for s in scores)
    precision = _ratio(n_cov, n_gen)
    recall = _ratio(n_cov, n_gt)
    return ChairResult(
        chair_s=_ratio(n_hall_caps, len(scores)),
        chair_i=_ratio(n_hall, n_mentions),
        precision=precision,
        recall=recall,
        f1=_ratio(2.0 * precision * recall, precision + recall),
        mention_precision=_ratio(n_mentions - n_hall, n_mentions),
        n_captions=len(scores),
        n_mentions=n_mentions,
        n_hallucinated_mentions=n_hall,
        n_hallucinated_captions=n_hall_caps,
        n_ground_truth=n_gt,
        n_covered=n_cov,
        n_distinct_generated=n_gen,
    )


def score_captions(
    records: Sequence[CaptionRecord],
    annotations: CocoAnnotations | GroundTruth,
    extractor: Extractor | None = None,
) -> list[CaptionChair]:
    """Score each caption; pass a :class:`GroundTruth` to share it between caption files.

    Without ``extractor`` (and without a GroundTruth) the ``extended`` extractor reads the
    captions; ``make_extractor("opera")`` is the paper's protocol (needs NLTK).
    """
    if isinstance(annotations, GroundTruth):
        truth = annotations
        if extractor is not None and extractor is not truth.extractor:
            raise ValueError("the GroundTruth was built with another extractor")
    else:
        truth = GroundTruth(annotations, extractor or ObjectExtractor())
    return [
        score_caption(r.image_id, r.caption, truth(r.image_id), truth.extractor)
        for r in records
    ]


def compute_chair(
    records: Sequence[CaptionRecord],
    annotations: CocoAnnotations | GroundTruth,
    extractor: Extractor | None = None,
) -> ChairResult:
    """CHAIR over ``records`` (one caption per image) against ``annotations``."""
    return summarize(score_captions(records, annotations, extractor))


def caption_details(score: CaptionChair) -> dict[str, object]:
    """One line of ``kvsmooth-eval chair --per-caption``: what was found, and why."""
    return {
        "image_id": score.image_id,
        "mentions": [[m.words, m.category] for m in score.mentions],
        "hallucinated": [[m.words, m.category] for m in score.hallucinated],
        "ground_truth": sorted(score.ground_truth),
        "covered": sorted(score.covered),
    }
