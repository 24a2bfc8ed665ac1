"""CHAIR's object extraction as OPERA's ``chair.py`` does it (the paper's protocol).

The CHAIR numbers of the KVSmooth paper and of the methods it compares against come from
OPERA's ``chair.py`` (shikiw/OPERA @61426ef, itself LisaAnne/Hallucination's ``chair.py``
with recall added). Its ``caption_to_words``, reproduced here step by step:

1. ``nltk.word_tokenize(caption.lower())``;
2. ``nltk.pos_tag``; a tag starting with J, V, N or R lemmatises as adjective, verb, noun or
   adverb, anything else as a noun (``WordNetLemmatizer``: the shortest form WordNet knows);
3. two-word merge, left to right: a pair of lemmas found in the double-word table becomes
   its value and both are consumed;
4. if both "toilet" and "seat" remain, every "seat" is dropped;
5. each remaining word that is in the synonym list (``data/opera_synonyms.txt``, OPERA's
   embedded copy of LisaAnne's ``synonyms.txt``; lines split on exactly ", ") is a mention of
   its line's first entry.

The quirks that follow are kept on purpose, because they are in the published numbers:
"men" lemmatises to itself (no person), "vases" to "vas" (no vase); " motor bike" and
" cheesecake" carry a leading space in the list and never match; tags depend on context
("parking" as a verb gives no parking meter; "skiing" as a verb is skis); "stuffed bear" is a
bear; only "baby"/"adult" animals lose the person, so "mother elephant" is a person and an
elephant.
"""

from __future__ import annotations

from pathlib import Path

from .chair import Mention
from .coco import PathLike
from .nlp import NltkPipeline, pipeline

SYNONYMS_FILE = Path(__file__).with_name("data") / "opera_synonyms.txt"

# two-word phrases that are one object (value: themselves)
DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light",
    "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter", "suit case",
    "sports ball", "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog",
    "cell phone", "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie",
    "laptop computer", "stove top oven", "home plate", "train track",
)
# "baby X" / "adult X" is X, not a person
ANIMAL_WORDS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)
# "passenger X" is X, not a person
VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")


def double_word_table() -> dict[str, str]:
    """OPERA's ``double_word_dict``, built in its order (later entries win)."""
    table = {phrase: phrase for phrase in DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


def read_synonyms(path: PathLike = SYNONYMS_FILE) -> list[list[str]]:
    """The synonym list: one entry list per line, split exactly as OPERA does."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.strip().split(", ") for line in text.splitlines() if line.strip()]


def _wordnet_pos(tag: str) -> str:
    if tag.startswith("J"):
        return "a"
    if tag.startswith("V"):
        return "v"
    if tag.startswith("R"):
        return "r"
    return "n"  # N..., and OPERA's fallback for every other tag


class OperaExtractor:
    """OPERA's ``caption_to_words``: the objects of a caption, every mention in order."""

    name = "opera"

    def __init__(
        self,
        nltk_data: PathLike | None = None,
        nlp: NltkPipeline | None = None,
        synonyms_path: PathLike = SYNONYMS_FILE,
    ) -> None:
        self._nlp = nlp if nlp is not None else pipeline(nltk_data)
        lines = read_synonyms(synonyms_path)
        self._inverse: dict[str, str] = {}
        for entries in lines:
            for word in entries:
                self._inverse[word] = entries[0]
        self.categories: tuple[str, ...] = tuple(dict.fromkeys(e[0] for e in lines))
        self._double_words = double_word_table()

    def lemmas(self, text: str) -> list[str]:
        """Steps 1-2: lower-cased tokens, tagged and lemmatised."""
        tokens = self._nlp.tokenize(text.lower())
        return [self._nlp.lemmatize(w, _wordnet_pos(t)) for w, t in self._nlp.tag(tokens)]

    def words(self, text: str) -> list[str]:
        """Steps 1-3: the lemmas after the two-word merge (OPERA's per-caption ``words``)."""
        lemmas = self.lemmas(text)
        merged: list[str] = []
        i = 0
        while i < len(lemmas):
            pair = " ".join(lemmas[i : i + 2])
            if pair in self._double_words:
                merged.append(self._double_words[pair])
                i += 2
            else:
                merged.append(lemmas[i])
                i += 1
        return merged

    def mentions(self, text: str) -> list[Mention]:
        """Steps 4-5; ``index`` is the mention's position in :meth:`words`."""
        words = self.words(text)
        drop_seat = "toilet" in words and "seat" in words
        return [
            Mention(words=w, category=self._inverse[w], index=k)
            for k, w in enumerate(words)
            if w in self._inverse and not (drop_seat and w == "seat")
        ]

    def objects(self, text: str) -> frozenset[str]:
        return frozenset(m.category for m in self.mentions(text))

    def category_of(self, label: str) -> str | None:
        """An instance label's object, as OPERA maps segmentation categories."""
        return self._inverse.get(label)
