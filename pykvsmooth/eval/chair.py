"""CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image Captioning").

Definitions, as in the original code and the KVSmooth paper (Appendix B), over a set of
generated captions, one per image:

- an object *mention* is an occurrence of a COCO object word in a caption (a caption that
  says "a man ... the man" mentions person twice);
- a mention is *hallucinated* when its category is not among the image's ground-truth
  objects: its instance labels plus the objects its reference captions mention;
- CHAIR_S = captions with at least one hallucinated mention / captions;
- CHAIR_I = hallucinated mentions / mentions;
- precision = mentions that are not hallucinated / mentions (= 1 - CHAIR_I), the
  "proportion of generated objects that correctly appear in the ground-truth";
- recall = Σ |distinct mentioned categories ∩ ground truth| / Σ |ground truth| over all
  images (micro average, as in OPERA's CHAIR code, which the paper follows);
- F1 = 2 · precision · recall / (precision + recall).

Choices where neither source decides: with no mentions at all CHAIR_I and precision are 0
(0/0); F1 is 0 when precision + recall is 0.

Object words are found without any NLP model: the caption is lower-cased, possessive
"'s" is dropped, it is split into runs of letters, and the longest phrase of the synonym
table (singular or plural form) starting at each word wins, so "hot dogs" is one hot dog
and not a dog. Plurals are generated from the table by spelling rules
(:func:`pluralize`), so only the table's own words are ever singularized.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from . import synonyms
from .coco import CaptionRecord, CocoAnnotations, CocoImage, EvalError

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


class ObjectExtractor:
    """Finds the COCO objects a text mentions, with the tables in :mod:`.synonyms`."""

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


def ground_truth_objects(image: CocoImage, extractor: ObjectExtractor) -> frozenset[str]:
    """The image's instance labels plus every object its reference captions mention."""
    unknown = image.instance_objects.difference(extractor.categories)
    if unknown:
        raise EvalError(
            f"image {image.image_id}: categories {sorted(unknown)} are not COCO's 80"
        )
    found = set(image.instance_objects)
    for caption in image.reference_captions:
        found.update(extractor.objects(caption))
    return frozenset(found)


@dataclasses.dataclass(frozen=True)
class CaptionChair:
    """CHAIR's view of one caption."""

    image_id: int
    mentions: tuple[Mention, ...]
    hallucinated: tuple[Mention, ...]
    ground_truth: frozenset[str]
    covered: frozenset[str]  # ground-truth categories the caption mentions


@dataclasses.dataclass(frozen=True)
class ChairResult:
    """Corpus-level CHAIR; the rates are fractions in [0, 1]."""

    chair_s: float
    chair_i: float
    precision: float
    recall: float
    f1: float
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_hallucinated_captions: int
    n_ground_truth: int
    n_covered: int

    def as_percent(self) -> dict[str, float]:
        """The JSON shape ``kvsmooth-eval chair`` prints: rates in percent, and counts."""
        return {
            "CHAIR_S": round(100.0 * self.chair_s, 4),
            "CHAIR_I": round(100.0 * self.chair_i, 4),
            "precision": round(100.0 * self.precision, 4),
            "recall": round(100.0 * self.recall, 4),
            "F1": round(100.0 * self.f1, 4),
            "n_captions": self.n_captions,
            "n_mentions": self.n_mentions,
            "n_hallucinated_mentions": self.n_hallucinated_mentions,
            "n_hallucinated_captions": self.n_hallucinated_captions,
            "n_ground_truth": self.n_ground_truth,
            "n_covered": self.n_covered,
        }


def score_caption(
    image_id: int, caption: str, ground_truth: frozenset[str], extractor: ObjectExtractor
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
    precision = _ratio(n_mentions - n_hall, n_mentions)
    recall = _ratio(n_cov, n_gt)
    f1 = _ratio(2.0 * precision * recall, precision + recall)
    return ChairResult(
        chair_s=_ratio(n_hall_caps, len(scores)),
        chair_i=_ratio(n_hall, n_mentions),
        precision=precision,
        recall=recall,
        f1=f1,
        n_captions=len(scores),
        n_mentions=n_mentions,
        n_hallucinated_mentions=n_hall,
        n_hallucinated_captions=n_hall_caps,
        n_ground_truth=n_gt,
        n_covered=n_cov,
    )


def score_captions(
    records: Sequence[CaptionRecord],
    annotations: CocoAnnotations,
    extractor: ObjectExtractor | None = None,
) -> list[CaptionChair]:
    extractor = extractor or ObjectExtractor()
    return [
        score_caption(
            r.image_id,
            r.caption,
            ground_truth_objects(annotations.image(r.image_id), extractor),
            extractor,
        )
        for r in records
    ]


def compute_chair(
    records: Sequence[CaptionRecord],
    annotations: CocoAnnotations,
    extractor: ObjectExtractor | None = None,
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
