"""`kvsmooth-eval amber`: AMBER's generative metrics on a small case computed by hand from
AMBER's ``inference.py`` rules (nouns by NLTK, truth / hallu objects with their associated
words, safe words, the optional near-synonym test, denominators starting at 0.001)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pykvsmooth.eval.__main__ import main
from pykvsmooth.eval.amber import (
    AmberData,
    SpacySimilarity,
    evaluate_amber,
    load_amber,
    read_responses,
)
from pykvsmooth.eval.coco import EvalError

NLTK_DATA = Path(__file__).resolve().parent / "data" / "eval" / "nltk_data"

RELATION = {
    "dog": ["puppy"], "grass": ["ground"], "person": ["man", "woman"], "frisbee": [],
    "cat": [], "tree": ["forest"], "car": [], "light": [],
}
ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "grass", "person"], "hallu": ["cat", "frisbee"]},
    {"id": 2, "type": "generative", "truth": ["tree", "tree"], "hallu": ["car"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 4, "type": "generative", "truth": ["cat"], "hallu": ["dog"]},
]
RESPONSES = {
    # nouns (NN*, lemmatised) in AMBER's vocabulary: man frisbee puppy grass light
    #   man -> person, puppy -> dog, grass -> grass: truth 3/3; light: a safe word;
    #   frisbee: a hallu object (Cog 1/2) and, with no similar truth word, hallucinated
    1: "A man throws a frisbee to two puppies on the grass under a light.",
    # tree, forest, car: both truth entries are "tree" and a match covers the first one
    #   only: truth 1/2; car: hallu 1/1, hallucinated
    2: "Two trees and a forest near cars.",
    # kitten is not in the vocabulary: no objects, nothing hallucinated, truth 0/1
    4: "A kitten.",
}
# objects 5 + 3 + 0 = 8, hallucinated 2; truth 6, covered 4; hallu 4, covered 2;
# responses 3, 2 with a hallucination
EXACT = {
    "CHAIR": 100 * 2 / 8.001,
    "Cover": 100 * 4 / 6.001,
    "Hal": 100 * (1 - 1 / 3.001),
    "Cog": 100 * 2 / 4.001,
}
# With a similarity that finds frisbee ~ cat (0.85) and frisbee ~ dog (0.9): frisbee also
# covers cat, the first hallu word it is similar to (Cog 3/4), and being similar to a truth
# word it is no hallucination; car stays one: CHAIR 1/8, Hal 1 of 3.
SIMILAR = {("frisbee", "cat"): 0.85, ("frisbee", "dog"): 0.9}
WITH_SIMILARITY = {
    "CHAIR": 100 * 1 / 8.001,
    "Cover": 100 * 4 / 6.001,
    "Hal": 100 * (1 - 2 / 3.001),
    "Cog": 100 * 3 / 4.001,
}


def fake_similarity(a: str, b: str) -> float:
    return 1.0 if a == b else SIMILAR.get((a, b), 0.0)


@pytest.fixture()
def amber_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "annotations.json").write_text(json.dumps(ANNOTATIONS))
    (d / "relation.json").write_text(json.dumps(RELATION))
    (d / "safe_words.txt").write_text("light\nsign")
    return d


def check(got: dict, expected: dict) -> None:
    assert list(got) == ["CHAIR", "Cover", "Hal", "Cog"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-3), key


def test_exact_matching_by_hand(amber_dir: Path) -> None:
    data = load_amber(amber_dir)
    assert sorted(data.items) == [1, 2, 4]  # the discriminative query is not scored
    result, judgements = evaluate_amber(RESPONSES, data, None, nltk_data=NLTK_DATA)
    assert judgements[0].objects == ("man", "frisbee", "puppy", "grass", "light")
    assert judgements[0].hallucinated == ("frisbee",)
    assert judgements[1].truth_covered == (True, False)
    assert (result.n_objects, result.n_hallucinated, result.n_truth, result.n_truth_covered,
            result.n_hallu, result.n_hallu_covered) == (8, 2, 6, 4, 4, 2)
    check(result.as_percent(), EXACT)


def test_near_synonyms_by_hand(amber_dir: Path) -> None:
    result, _ = evaluate_amber(RESPONSES, load_amber(amber_dir), fake_similarity, 0.8,
                               nltk_data=NLTK_DATA)
    check(result.as_percent(), WITH_SIMILARITY)
    # the test is "similarity > threshold": at 0.9 neither frisbee ~ dog (0.9) nor
    # frisbee ~ cat (0.85) counts, which gives the exact-match numbers back
    strict, _ = evaluate_amber(RESPONSES, load_amber(amber_dir), fake_similarity, 0.9,
                               nltk_data=NLTK_DATA)
    check(strict.as_percent(), EXACT)


def test_cli_reads_amber_and_kvsmooth_caption_files(
    amber_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    amber_format = tmp_path / "responses.json"
    amber_format.write_text(json.dumps([{"id": i, "response": r} for i, r in RESPONSES.items()]))
    captioned = tmp_path / "captions.jsonl"
    captioned.write_text("".join(
        json.dumps({"path": f"/data/amber/image/AMBER_{i}.jpg", "caption": r}) + "\n"
        for i, r in RESPONSES.items()
    ))
    details = tmp_path / "details.jsonl"
    for path in (amber_format, captioned):
        rc = main(["amber", str(path), "--data", str(amber_dir), "--no-similarity",
                   "--nltk-data", str(NLTK_DATA), "--per-response", str(details)])
        assert rc == 0
        check(json.loads(capsys.readouterr().out), EXACT)
    first = json.loads(details.read_text().splitlines()[0])
    assert first["hallucinated"] == ["frisbee"]
    assert first["truth_covered"] == ["dog", "grass", "person"]


def test_errors(amber_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EvalError, match="annotations.json: no such file"):
        load_amber(tmp_path)
    data = load_amber(amber_dir)
    with pytest.raises(EvalError, match="not generative AMBER queries"):
        evaluate_amber({3: "Yes"}, data, None, nltk_data=NLTK_DATA)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": 1, "response": "a"}\n{"id": 1, "response": "b"}\n')
    with pytest.raises(EvalError, match="appears twice"):
        read_responses(twice)
    monkeypatch.setitem(sys.modules, "spacy", None)  # makes `import spacy` fail
    with pytest.raises(EvalError, match="python -m spacy download en_core_web_lg"):
        SpacySimilarity()
    assert isinstance(data, AmberData)
