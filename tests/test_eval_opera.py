"""CHAIR with ``--protocol opera`` against the reference scorers' own output.

``data/eval/stress-set/expected.json`` and ``data/eval/real/chair/expected.json`` were made
by running OPERA's ``chair.py`` and MiddleLayer's ``chair.py`` unmodified (NLTK 3.9.1, the
NLTK data in ``data/eval/nltk_data``), see ``data/eval/REFERENCE.md``. Every caption's
objects and every aggregate must come out the same.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from pykvsmooth.eval import nlp
from pykvsmooth.eval.__main__ import main
from pykvsmooth.eval.chair import GroundTruth, compute_chair, score_captions, summarize
from pykvsmooth.eval.coco import EvalError, load_annotations, read_caption_records
from pykvsmooth.eval.opera import OperaExtractor

DATA = Path(__file__).resolve().parent / "data" / "eval"
NLTK_DATA = DATA / "nltk_data"
STRESS = DATA / "stress-set"
REAL = DATA / "real" / "chair"
RUNS = ("a", "b", "c", "d")
KEYS = ["CHAIR_S", "CHAIR_I", "recall", "precision", "F1"]


@pytest.fixture(scope="module")
def extractor() -> OperaExtractor:
    return OperaExtractor(nltk_data=NLTK_DATA)


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads((STRESS / "expected.json").read_text(encoding="utf-8"))


def test_nltk_smoke(extractor: OperaExtractor) -> None:
    # nltk_data/README.md: tags CD NNS VBP VBN IN DT NN . and these lemmas
    assert extractor.lemmas("two men are seated on a bench.") == [
        "two", "men", "be", "seat", "on", "a", "bench", ".",
    ]


@pytest.mark.parametrize("run", RUNS)
def test_stress_set_objects_per_caption(
    run: str, extractor: OperaExtractor, expected: dict[str, Any]
) -> None:
    annotations = load_annotations(
        STRESS / "instances_val2014.json", STRESS / "captions_val2014.json"
    )
    records = read_caption_records(STRESS / f"run_{run}.jsonl")
    scores = score_captions(records, annotations, extractor)
    reference = {c["image_id"]: c for c in expected["captions"] if c["run"] == run}
    assert len(scores) == len(reference) == 20
    for record, score in zip(records, scores):
        ref = reference[record.image_id]
        assert extractor.words(record.caption) == ref["lemmas"], record.image_id
        assert [m.category for m in score.mentions] == ref["objects"], record.image_id
        assert [m.words for m in score.mentions] == ref["words"], record.image_id
        assert [m.category for m in score.hallucinated] == ref["hallucinated"], record.image_id
        assert sorted(score.ground_truth) == sorted(
            expected["ground_truth"][str(record.image_id)]
        ), record.image_id


def _check_aggregates(result: Any, reference: dict[str, Any]) -> None:
    for key, value in result.as_percent().items():
        assert value == pytest.approx(reference[key], abs=1e-3), key
    for key, value in result.counts().items():
        assert value == reference[key], key


def test_stress_set_aggregates(extractor: OperaExtractor, expected: dict[str, Any]) -> None:
    annotations = load_annotations(
        STRESS / "instances_val2014.json", STRESS / "captions_val2014.json"
    )
    truth = GroundTruth(annotations, extractor)
    pooled = []
    for run in RUNS:
        scores = score_captions(read_caption_records(STRESS / f"run_{run}.jsonl"), truth)
        _check_aggregates(summarize(scores), expected["runs"][f"run_{run}"])
        pooled += scores
    _check_aggregates(summarize(pooled), expected["runs"]["all 80 captions"])


def test_500_real_llava_captions(extractor: OperaExtractor) -> None:
    reference = json.loads((REAL / "expected.json").read_text(encoding="utf-8"))
    ref = reference["sets"]["opera-llava15-greedy"]
    annotations = load_annotations(REAL / "instances.json", REAL / "captions.json")
    result = compute_chair(read_caption_records(REAL / ref["gen"]), annotations, extractor)
    _check_aggregates(result, ref)


def test_cli_prints_exactly_the_five_numbers(
    capsys: pytest.CaptureFixture, expected: dict[str, Any], tmp_path: Path
) -> None:
    details = tmp_path / "details.jsonl"
    rc = main([
        "chair", str(STRESS / "run_a.jsonl"),
        "--instances", str(STRESS / "instances_val2014.json"),
        "--captions", str(STRESS / "captions_val2014.json"),
        "--nltk-data", str(NLTK_DATA), "--per-caption", str(details),
    ])  # --protocol opera is the default
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == KEYS
    for key in KEYS:
        assert out[key] == pytest.approx(expected["runs"]["run_a"][key], abs=1e-3), key
    first = json.loads(details.read_text().splitlines()[0])
    ref = next(c for c in expected["captions"] if c["run"] == "a" and c["image_id"] == 1)
    assert [category for _, category in first["mentions"]] == ref["objects"]


def test_opera_quirks_are_kept(extractor: OperaExtractor) -> None:
    def objects(text: str) -> list[str]:
        return [m.category for m in extractor.mentions(text)]

    # "men" stays men (no person), "women" is woman; "vases" lemmatises to "vas"
    assert objects("Two men and two women.") == ["person"]
    assert objects("Three vases on a shelf.") == []
    # only baby/adult lose the person: a mother elephant is a person and an elephant
    assert objects("A baby elephant.") == ["elephant"]
    assert objects("A mother elephant.") == ["person", "elephant"]
    # the seat goes when a toilet is named
    assert objects("The seat of the toilet.") == ["toilet"]
    assert objects("A seat on the bus.") == ["chair", "bus"]


def test_missing_nltk_data_names_the_downloader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nltk

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [])  # no other folder may be searched
    with pytest.raises(EvalError) as info:
        nlp.NltkPipeline(empty)
    message = str(info.value)
    assert "punkt_tab, averaged_perceptron_tagger_eng, wordnet not found" in message
    assert "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet" in message

    # one package there: the message names only the missing two
    partial = tmp_path / "partial"
    shutil.copytree(NLTK_DATA / "tokenizers", partial / "tokenizers")
    monkeypatch.setattr(nltk.data, "path", [])
    with pytest.raises(EvalError, match="averaged_perceptron_tagger_eng, wordnet not found"):
        nlp.NltkPipeline(partial)

    with pytest.raises(EvalError, match="no such folder"):
        nlp.NltkPipeline(tmp_path / "nowhere")


def test_cli_error_without_nltk_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import nltk

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(nlp, "_PIPELINES", {})
    rc = main([
        "chair", str(STRESS / "run_a.jsonl"),
        "--instances", str(STRESS / "instances_val2014.json"),
        "--captions", str(STRESS / "captions_val2014.json"), "--nltk-data", str(empty),
    ])
    assert rc == 1
    assert "python -m nltk.downloader" in capsys.readouterr().err


def test_without_nltk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)  # makes `import nltk` fail
    with pytest.raises(EvalError, match=r"pykvsmooth\[eval\]"):
        nlp.NltkPipeline(NLTK_DATA)
