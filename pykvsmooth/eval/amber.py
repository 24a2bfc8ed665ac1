"""AMBER's generative task: CHAIR, Cover, Hal and Cog (the paper's Table 3, left half).

AMBER (Wang et al., 2023, junyangwang0410/AMBER) is LLM-free: each response to "Describe
this image." (ids 1-1004, images ``AMBER_<id>.jpg``) is scored against the image's
annotation by AMBER's ``inference.py``, with AMBER's own files, which users download:
``data/annotations.json`` (per id: ``truth`` objects, ``hallu`` objects that models tend to
imagine there), ``data/relation.json`` (each object's associated words) and
``data/safe_words.txt``. The rule, per response:

1. nouns: ``nltk.word_tokenize`` of the raw response, ``nltk.pos_tag``, every token tagged
   NN* lemmatised as a noun; only the nouns in AMBER's vocabulary (the keys and values of
   ``relation.json``) are kept: these are the response's objects;
2. an object in ``safe_words.txt`` is skipped (neither right nor wrong);
3. an object equal to a truth object or one of its associated words covers that truth
   object (the first match) and is not a hallucination;
4. otherwise, equal to a ``hallu`` object or one of its associated words, it covers that
   hallu object; then, with word vectors, the first hallu word it is similar to
   (spaCy ``en_core_web_lg``, similarity > 0.8) is covered, and if it is similar to a truth
   word it covers that one and is not a hallucination;
5. what is left is a hallucinated object.

Pooled over the responses (percent):
CHAIR = hallucinated objects / objects; Cover = covered truth objects / truth objects;
Hal = responses with a hallucinated object / responses; Cog = covered hallu objects / hallu
objects. AMBER starts every denominator at 0.001 (``data/metrics.txt``), kept here, and
prints the numbers rounded to 0.1.

Without spaCy (``--no-similarity``) step 4's similarity is skipped: exact matches only,
which reads more objects as hallucinations than AMBER does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from .coco import EvalError, PathLike
from .nlp import NltkPipeline, pipeline

N_GENERATIVE = 1004
DENOMINATOR_START = 0.001  # AMBER's data/metrics.txt starts every *_num at 0.001
DEFAULT_SPACY_MODEL = "en_core_web_lg"
DEFAULT_SIMILARITY = 0.8
FILES = ("annotations.json", "relation.json", "safe_words.txt")
_AMBER_IMAGE = re.compile(r"AMBER_(\d+)\.\w+$")

# similarity of two words (AMBER: spaCy Doc.similarity)
Similarity = Callable[[str, str], float]


@dataclasses.dataclass(frozen=True)
class AmberItem:
    """One generative annotation of ``annotations.json``."""

    id: int
    truth: tuple[str, ...]
    hallu: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AmberData:
    items: dict[int, AmberItem]
    association: dict[str, tuple[str, ...]]
    safe_words: frozenset[str]

    @property
    def vocabulary(self) -> frozenset[str]:
        words = set(self.association)
        for related in self.association.values():
            words.update(related)
        return frozenset(words)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvalError(
            f"{path}: no such file; AMBER's data folder (data/ of "
            "github.com/junyangwang0410/AMBER) has annotations.json, relation.json and "
            "safe_words.txt"
        ) from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


def load_amber(data_dir: PathLike) -> AmberData:
    """AMBER's annotation, word-association and safe-word files from its ``data/`` folder."""
    folder = Path(data_dir)
    annotations, relation = (_read_json(folder / name) for name in FILES[:2])
    try:
        association = {str(k): tuple(str(w) for w in v) for k, v in dict(relation).items()}
    except (TypeError, ValueError) as e:
        raise EvalError(f"{folder / 'relation.json'}: expected an object of word lists ({e!r})") from None
    items: dict[int, AmberItem] = {}
    try:
        for entry in annotations:
            if entry.get("type") != "generative":
                continue
            item = AmberItem(int(entry["id"]), tuple(entry["truth"]), tuple(entry["hallu"]))
            for word in (*item.truth, *item.hallu):
                if word not in association:
                    raise EvalError(
                        f"{folder / 'annotations.json'}: id {item.id}: {word!r} is not in relation.json"
                    )
            items[item.id] = item
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{folder / 'annotations.json'}: not AMBER's annotations ({e!r})") from None
    if not items:
        raise EvalError(f"{folder / 'annotations.json'}: no generative annotations")
    try:
        text = (folder / FILES[2]).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{folder / FILES[2]}: no such file") from None
    # inference.py keeps each line up to its newline, so a trailing "\r" would stay
    safe = frozenset(line for line in text.split("\n"))
    return AmberData(items, association, safe)


def _response_id(obj: Mapping[str, Any]) -> int:
    if "id" in obj:
        return int(obj["id"])
    if "image_id" in obj:
        return int(obj["image_id"])
    if "path" in obj:  # a kvsmooth-caption record
        match = _AMBER_IMAGE.search(str(obj["path"]))
        if match:
            return int(match.group(1))
    raise ValueError("no id, image_id or AMBER_<id> image path")


def read_responses(path: PathLike, field: str | None = None) -> dict[int, str]:
    """Responses by AMBER id: AMBER's JSON list of ``{"id", "response"}``, or JSON lines of
    ``{"id" | "image_id", "response" | "caption"}`` or ``kvsmooth-caption`` records (id from
    the image name ``AMBER_<id>.jpg``). ``field`` names the text's key (default: response,
    else caption)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    try:
        data = json.loads(text)
        entries = data if isinstance(data, list) else [data]
        where = [f"{path}[{k}]" for k in range(len(entries))]
    except json.JSONDecodeError:
        entries, where = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{lineno}: not valid JSON ({e})") from None
                where.append(f"{path}:{lineno}")
    responses: dict[int, str] = {}
    for obj, place in zip(entries, where):
        try:
            if "error" in obj and field is None and "caption" not in obj:
                raise EvalError(f"{place}: this image was not captioned ({obj['error']})")
            key = field or ("response" if "response" in obj else "caption")
            response_id, response = _response_id(obj), obj[key]
        except (KeyError, TypeError, ValueError) as e:
            raise EvalError(f"{place}: expected an id and a response ({e!r})") from None
        if not isinstance(response, str):
            raise EvalError(f"{place}: the response must be a string")
        if response_id in responses:
            raise EvalError(f"{place}: id {response_id} appears twice")
        responses[response_id] = response
    if not responses:
        raise EvalError(f"{path}: no responses")
    return responses


@dataclasses.dataclass(frozen=True)
class AmberJudgement:
    """AMBER's view of one response."""

    id: int
    objects: tuple[str, ...]  # the response's nouns in AMBER's vocabulary, in order
    hallucinated: tuple[str, ...]
    truth_covered: tuple[bool, ...]  # per truth object (as listed, repeats included)
    hallu_covered: tuple[bool, ...]  # per hallu object


def judge(
    response_id: int,
    objects: Sequence[str],
    item: AmberItem,
    data: AmberData,
    similar: Callable[[str, str], bool] | None = None,
) -> AmberJudgement:
    """Steps 2-5 of the module doc for one response's objects."""

    def expand(words: Sequence[str]) -> tuple[list[str], list[int]]:
        # associated words first (each with the index of its object), then the objects
        flat: list[str] = []
        owner: list[int] = []
        for k, word in enumerate(words):
            flat += data.association[word]
            owner += [k] * len(data.association[word])
        flat += words
        owner += range(len(words))
        return flat, owner

    truth_words, truth_owner = expand(item.truth)
    hallu_words, hallu_owner = expand(item.hallu)
    truth_hit = [False] * len(item.truth)
    hallu_hit = [False] * len(item.hallu)
    hallucinated = []
    for noun in objects:
        if noun in data.safe_words:
            continue
        if noun in truth_words:
            truth_hit[truth_owner[truth_words.index(noun)]] = True
            continue
        if noun in hallu_words:
            hallu_hit[hallu_owner[hallu_words.index(noun)]] = True
        if similar is not None:
            j = next((j for j, w in enumerate(hallu_words) if similar(noun, w)), None)
            if j is not None:
                hallu_hit[hallu_owner[j]] = True
            j = next((j for j, w in enumerate(truth_words) if similar(noun, w)), None)
            if j is not None:
                truth_hit[truth_owner[j]] = True
                continue
        hallucinated.append(noun)
    return AmberJudgement(
        response_id, tuple(objects), tuple(hallucinated), tuple(truth_hit), tuple(hallu_hit)
    )


@dataclasses.dataclass(frozen=True)
class AmberResult:
    """AMBER's generative metrics; the rates are fractions in [0, 1]."""

    chair: float
    cover: float
    hal: float
    cog: float
    n_responses: int
    n_objects: int
    n_hallucinated: int
    n_truth: int
    n_truth_covered: int
    n_hallu: int
    n_hallu_covered: int
    n_hallucinated_responses: int

    def as_percent(self) -> dict[str, float]:
        return {
            "CHAIR": round(100.0 * self.chair, 4),
            "Cover": round(100.0 * self.cover, 4),
            "Hal": round(100.0 * self.hal, 4),
            "Cog": round(100.0 * self.cog, 4),
        }

    def counts(self) -> dict[str, int]:
        return {
            name: getattr(self, name)
            for name in (
                "n_responses", "n_objects", "n_hallucinated", "n_truth", "n_truth_covered",
                "n_hallu", "n_hallu_covered", "n_hallucinated_responses",
            )
        }


def summarize(judgements: Sequence[AmberJudgement]) -> AmberResult:
    if not judgements:
        raise EvalError("no generative responses to evaluate")
    n_obj = sum(len(j.objects) for j in judgements)
    n_hall = sum(len(j.hallucinated) for j in judgements)
    n_truth = sum(len(j.truth_covered) for j in judgements)
    n_cov = sum(sum(j.truth_covered) for j in judgements)
    n_hallu = sum(len(j.hallu_covered) for j in judgements)
    n_cog = sum(sum(j.hallu_covered) for j in judgements)
    n_bad = sum(1 for j in judgements if j.hallucinated)
    d = DENOMINATOR_START
    return AmberResult(
        chair=n_hall / (n_obj + d),
        cover=n_cov / (n_truth + d),
        hal=1.0 - (len(judgements) - n_bad) / (len(judgements) + d),
        cog=n_cog / (n_hallu + d),
        n_responses=len(judgements),
        n_objects=n_obj,
        n_hallucinated=n_hall,
        n_truth=n_truth,
        n_truth_covered=n_cov,
        n_hallu=n_hallu,
        n_hallu_covered=n_cog,
        n_hallucinated_responses=n_bad,
    )


class SpacySimilarity:
    """AMBER's ``check_synonyms_word`` measure: spaCy ``Doc.similarity`` of two words."""

    def __init__(self, model: str = DEFAULT_SPACY_MODEL) -> None:
        try:
            import spacy
        except ImportError:
            raise EvalError(
                "AMBER compares words with spaCy's word vectors: pip install spacy && "
                f"python -m spacy download {model}  (or pass --no-similarity: exact matches "
                "only, not AMBER's numbers)"
            ) from None
        try:
            self._nlp = spacy.load(model)
        except OSError:
            raise EvalError(
                f"spaCy model {model} is not installed: python -m spacy download {model}"
            ) from None
        self._docs: dict[str, Any] = {}

    def _doc(self, word: str) -> Any:
        if word not in self._docs:
            self._docs[word] = self._nlp(word)
        return self._docs[word]

    def __call__(self, a: str, b: str) -> float:
        with warnings.catch_warnings():  # words without vectors (AMBER hides the warning)
            warnings.simplefilter("ignore", UserWarning)
            return float(self._doc(a).similarity(self._doc(b)))


def response_objects(text: str, vocabulary: frozenset[str], nlp: NltkPipeline) -> list[str]:
    """Step 1: the response's nouns (NN* tags, lemmatised) that AMBER knows."""
    tagged = nlp.tag(nlp.tokenize(text))
    nouns = [nlp.lemmatize(word, "n") for word, tag in tagged if tag.startswith("NN")]
    return [n for n in nouns if n in vocabulary]


def evaluate_amber(
    responses: Mapping[int, str],
    data: AmberData,
    similarity: Similarity | None = None,
    threshold: float = DEFAULT_SIMILARITY,
    nlp: NltkPipeline | None = None,
    nltk_data: PathLike | None = None,
) -> tuple[AmberResult, list[AmberJudgement]]:
    """Score the generative responses (ids of discriminative queries are an error)."""
    unknown = sorted(set(responses) - set(data.items))
    if unknown:
        raise EvalError(
            f"{len(unknown)} response ids are not generative AMBER queries (e.g. {unknown[0]}); "
            f"the generative task is ids 1-{N_GENERATIVE}"
        )
    nlp = nlp if nlp is not None else pipeline(nltk_data)
    vocabulary = data.vocabulary

    similar: Callable[[str, str], bool] | None = None
    if similarity is not None:
        measure = similarity

        def similar(a: str, b: str) -> bool:
            return measure(a, b) > threshold

    judgements = [
        judge(i, response_objects(responses[i], vocabulary, nlp), data.items[i], data, similar)
        for i in sorted(responses)
    ]
    return summarize(judgements), judgements


def judgement_details(j: AmberJudgement, item: AmberItem) -> dict[str, object]:
    """One line of ``kvsmooth-eval amber --per-response``."""
    return {
        "id": j.id,
        "objects": list(j.objects),
        "hallucinated": list(j.hallucinated),
        "truth_covered": [w for w, hit in zip(item.truth, j.truth_covered) if hit],
        "truth_missed": [w for w, hit in zip(item.truth, j.truth_covered) if not hit],
        "hallu_covered": [w for w, hit in zip(item.hallu, j.hallu_covered) if hit],
    }
