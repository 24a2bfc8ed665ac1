"""OPOPE with ``--protocol halc`` (the default): HALC's answer rule, its probe selection and
POPE's question files, on cases worked out by hand, and on 53 real POPE images against the
figures of HALC's own functions (``data/eval/real/opope/expected.json``)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from pykvsmooth.eval.__main__ import main
from pykvsmooth.eval.coco import (
    CaptionRecord,
    EvalError,
    load_annotations,
    read_caption_records,
)
from pykvsmooth.eval.halc import (
    Segment,
    build_questions,
    evaluate_halc,
    read_pope_questions,
    read_segmentation,
    says_yes,
    segments_from_annotations,
)
from pykvsmooth.eval.opope import STRATEGIES

REAL = Path(__file__).resolve().parent / "data" / "eval" / "real" / "opope"


@pytest.mark.parametrize(
    "caption, name, yes",
    [
        ("A catcher and a pitcher.", "cat", True),  # substring, not a word
        ("He carries a bag.", "car", True),
        ("A cat on a table.", "dining table", True),  # any word of the name
        ("A baseball game.", "baseball glove", True),
        ("A man on a bench.", "person", False),  # no synonyms
        ("A TV and a television.", "tv", False),  # case-sensitive
        ("A Dog.", "dog", False),
        ("A dog.", "dog", True),
    ],
)
def test_answer_rule(caption: str, name: str, yes: bool) -> None:
    assert says_yes(caption, name) is yes


def negatives(questions: Sequence) -> list[tuple[int, str]]:
    return [(q.image_id, q.object) for q in questions if not q.label]


# File order 30, 10, 20, 40 (not id order); 40 has one object and is not probed.
#   frequency over the probed lists, first-seen order: dog 2, person 2, frisbee 1, car 1, cat 1
#   popular ranking (ties keep first-seen order): dog, person, frisbee, car, cat
POPULAR_SET = [
    Segment(30, ("dog", "person", "frisbee")),
    Segment(10, ("car", "person")),
    Segment(20, ("cat", "dog")),
    Segment(40, ("person",)),
]


def test_popular_by_hand() -> None:
    # 30: after dog: person and frisbee are in the image -> car; after person: dog, car
    #     asked -> cat
    # 10: after car -> dog; after person: dog asked, person -> frisbee
    # 20: after cat: dog in the image -> person; after dog: person asked -> frisbee
    questions = build_questions(POPULAR_SET, "popular", num_samples=2)
    assert [(q.image_id, q.object, q.label) for q in questions[:4]] == [
        (30, "dog", True), (30, "car", False), (30, "person", True), (30, "cat", False),
    ]
    assert negatives(questions) == [
        (30, "car"), (30, "cat"), (10, "dog"), (10, "frisbee"), (20, "person"), (20, "frisbee"),
    ]


# num_samples = 1; co-occurrence rows (count, then first-seen order):
#   dog: frisbee 2, person 1, cat 1, car 1, bus 1     person: dog, frisbee, car, cat (1 each)
#   cat: person, car, dog (1 each)                    frisbee: dog 2, person 1, car 1
ADVERSARIAL_SET = [
    Segment(1, ("dog", "person", "frisbee")),
    Segment(2, ("person", "car", "cat")),
    Segment(3, ("cat", "dog")),
    Segment(4, ("frisbee", "dog", "car")),
    Segment(5, ("dog", "bus")),
]


def test_adversarial_by_hand() -> None:
    # 1 dog: frisbee, person in the image -> cat    2 person -> dog    3 cat -> person
    # 4 frisbee: dog in the image -> person         5 dog -> frisbee (count 2 beats person)
    questions = build_questions(ADVERSARIAL_SET, "adversarial", num_samples=1)
    assert negatives(questions) == [(1, "cat"), (2, "dog"), (3, "person"), (4, "person"), (5, "frisbee")]


def test_random_is_one_seeded_stream_over_the_first_seen_pool() -> None:
    # HALC seeds Python's random once and draws random.choice(pool) again while the draw
    # is in the image or already asked; the pool is in first-seen order
    segments = POPULAR_SET[:3]
    pool = ["dog", "person", "frisbee", "car", "cat"]
    random.seed(7)  # the module-level stream, as HALC uses it
    expected = []
    for s in segments:
        asked = []
        for positive in s.objects[:2]:
            asked.append(positive)
            draw = random.choice(pool)
            while draw in asked or draw in s.objects:
                draw = random.choice(pool)
            asked.append(draw)
            expected.append((s.image_id, draw))
    assert negatives(build_questions(segments, "random", num_samples=2, seed=7)) == expected
    assert build_questions(segments, "random", 2, seed=8) != build_questions(segments, "random", 2, seed=7)


def test_adversarial_falls_back_to_the_random_stream() -> None:
    # rows: car {person}, dog {cat, bus}; image 1's car has only person, which is in the
    # image: a random negative from the seeded stream; 2's dog: cat is there -> bus;
    # 3's dog -> cat
    segments = [Segment(1, ("car", "person")), Segment(2, ("dog", "cat")), Segment(3, ("dog", "bus"))]
    questions = build_questions(segments, "adversarial", num_samples=1, seed=3)
    rng = random.Random(3)
    pool = ["car", "person", "dog", "cat", "bus"]
    draw = rng.choice(pool)
    while draw in ("car", "person"):
        draw = rng.choice(pool)
    assert negatives(questions) == [(1, draw), (2, "bus"), (3, "cat")]


def test_no_negative_left_is_an_error_not_a_hang() -> None:
    with pytest.raises(EvalError, match="no object left"):
        build_questions([Segment(1, ("cat", "dog")), Segment(2, ("dog", "cat"))], "random", 2)


def test_segments_from_instances_keep_file_and_annotation_order(tmp_path: Path) -> None:
    names = ["person", "dog", "car"]
    data = {
        "images": [{"id": 7, "file_name": "7.jpg"}, {"id": 3, "file_name": "3.jpg"},
                   {"id": 5, "file_name": "5.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 3},
            {"id": 2, "image_id": 7, "category_id": 2},
            {"id": 3, "image_id": 3, "category_id": 1},
            {"id": 4, "image_id": 7, "category_id": 1},
            {"id": 5, "image_id": 3, "category_id": 3},
        ],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    segments = segments_from_annotations(load_annotations(path), [3, 7])
    assert segments == [Segment(7, ("dog", "person")), Segment(3, ("car", "person"))]
    with pytest.raises(EvalError, match="image_id 99"):
        segments_from_annotations(load_annotations(path), [99])


def test_read_halc_segmentation_file(tmp_path: Path) -> None:
    path = tmp_path / "seg.json"
    path.write_text(
        json.dumps({"image": "COCO_val2014_000000000020.jpg", "objects": ["cat", "dog"]}) + "\n"
        + json.dumps({"image": "COCO_val2014_000000000010.jpg", "objects": ["car"]}) + "\n"
        + json.dumps({"image_id": 30, "image": "x.jpg", "objects": ["bus", "person"]}) + "\n"
    )
    assert read_segmentation(path, [10, 20]) == [Segment(20, ("cat", "dog")), Segment(10, ("car",))]
    with pytest.raises(EvalError, match="not in the segmentation file"):
        read_segmentation(path, [10, 11])


# ------------------------------------------------------------- POPE's question files

CAPTIONS = {1: "A man rides a horse past a car.", 2: "A cat sleeping on a table."}
QUESTIONS = {
    # random: person FN (no "person"), dog TN, horse TP, car FP, cat TP, dining table FP
    "random": [(1, "person", "yes"), (1, "dog", "no"), (1, "horse", "yes"), (1, "car", "no"),
               (2, "cat", "yes"), (2, "dining table", "no")],
    # popular: horse TP, cat TN, cat TP, dog TN
    "popular": [(1, "horse", "yes"), (1, "cat", "no"), (2, "cat", "yes"), (2, "dog", "no")],
    # adversarial: horse TP, umbrella TN, apple FN, teddy bear TN
    "adversarial": [(1, "horse", "yes"), (1, "umbrella", "no"), (2, "apple", "yes"),
                    (2, "teddy bear", "no")],
}
# random:      TP 2 FP 2 TN 1 FN 1  acc 50   P 1/2  R 2/3  F_0.2 = 1.04*(1/3)/(0.02+2/3)
# popular:     TP 2 TN 2            acc 100  P 1    R 1    F_0.2 = 1
# adversarial: TP 1 TN 2 FN 1       acc 75   P 1    R 1/2  F_0.2 = 0.52/0.54
F_RANDOM = 1.04 * (1 / 3) / (0.02 + 2 / 3)
F_ADV = 0.52 / 0.54
SPLITS = {
    "random": {"accuracy": 50.0, "precision": 50.0, "recall": 200 / 3, "F_beta": 100 * F_RANDOM,
               "F1": 400 / 7, "TP": 2, "FP": 2, "TN": 1, "FN": 1},
    "popular": {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "F_beta": 100.0,
                "TP": 2, "FP": 0, "TN": 2, "FN": 0},
    "adversarial": {"accuracy": 75.0, "precision": 100.0, "recall": 50.0, "F_beta": 100 * F_ADV,
                    "TP": 1, "FP": 0, "TN": 2, "FN": 1},
}
AVERAGE = {
    "accuracy": 75.0,
    "precision": 250 / 3,
    "recall": (200 / 3 + 100 + 50) / 3,
    "F_beta": (100 * F_RANDOM + 100 + 100 * F_ADV) / 3,
}


def write_pope(tmp: Path) -> list[Path]:
    paths = []
    for split, rows in QUESTIONS.items():
        lines = []
        for k, (image_id, name, label) in enumerate(rows, start=1):
            article = "an" if name[0] in "aeiou" else "a"
            lines.append(json.dumps({
                "question_id": k, "image": f"COCO_val2014_{image_id:012d}.jpg",
                "text": f"Is there {article} {name} in the image?", "label": label,
            }))
        path = tmp / f"coco_pope_{split}.json"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def check(out: dict, splits: dict, average: dict) -> None:
    for key, value in average.items():
        assert out[key] == pytest.approx(value, abs=1e-3), key
    for split, expected in splits.items():
        for key, value in expected.items():
            assert out[split][key] == pytest.approx(value, abs=1e-3), (split, key)


def test_pope_question_files_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = write_pope(tmp_path)
    assert read_pope_questions(files[2])[2].object == "apple"  # "Is there an apple ...?"
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in CAPTIONS.items()))
    assert main(["opope", str(caps), "--questions", *map(str, files)]) == 0  # halc: the default
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["accuracy", "precision", "recall", "F_beta", *STRATEGIES]
    check(out, SPLITS, AVERAGE)


def test_pope_question_file_errors(tmp_path: Path) -> None:
    files = write_pope(tmp_path)
    records = [CaptionRecord(1, CAPTIONS[1])]  # image 2 has no caption
    with pytest.raises(EvalError, match="no caption"):
        evaluate_halc(records, questions=files)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"image": "COCO_val2014_000000000001.jpg",
                               "text": "What is this?", "label": "yes"}) + "\n")
    with pytest.raises(EvalError, match="is not 'Is there a/an X in the image"):
        read_pope_questions(bad)
    with pytest.raises(EvalError, match="three files"):
        evaluate_halc(records, questions=files[:2])


def test_halc_probes_from_instances_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Two images with three objects each (num_samples 3): the positives are all their
    # objects; the pool is {person, dog, car, cat, bus, horse}, so image 1's negatives are
    # three of {cat, bus, horse} and image 2's are {person, dog, car}, whatever the split.
    names = ["person", "dog", "car", "cat", "bus", "horse"]
    data = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"id": k, "image_id": 1 if k <= 3 else 2, "category_id": k} for k in range(1, 7)
        ],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps(data))
    caps = tmp_path / "caps.jsonl"
    # image 1: person FN ("man"), dog TP, car TP; negatives cat/bus/horse: "cat" FP (in
    # "catcher"), bus and horse TN. image 2: cat TP, bus TP, horse FN; negatives TN.
    caps.write_text(
        json.dumps({"image_id": 1, "caption": "A man, his dog and a catcher by a car."}) + "\n"
        + json.dumps({"image_id": 2, "caption": "A cat on a bus."}) + "\n"
    )
    assert main(["opope", str(caps), "--instances", str(inst)]) == 0
    out = json.loads(capsys.readouterr().out)
    # TP 4, FP 1, TN 5, FN 2: acc 9/12, P 4/5, R 4/6
    p, r = 0.8, 4 / 6
    f = 1.04 * p * r / (0.04 * p + r)
    for split in STRATEGIES:
        assert (out[split]["TP"], out[split]["FP"], out[split]["TN"], out[split]["FN"]) == (4, 1, 5, 2)
    check(out, {}, {"accuracy": 75.0, "precision": 80.0, "recall": 400 / 6, "F_beta": 100 * f})


def test_53_real_pope_images_match_halc() -> None:
    expected = json.loads((REAL / "expected.json").read_text(encoding="utf-8"))
    records = read_caption_records(REAL / expected["gen"])
    results = evaluate_halc(records, questions=[REAL / q for q in expected["questions"]],
                            beta=expected["beta"])
    for split, ref in expected["splits"].items():
        got = results[split].as_percent()
        for key in ("accuracy", "precision", "recall", "F1", "F_beta", "TP", "FP", "TN", "FN",
                    "n_questions"):
            assert got[key] == pytest.approx(ref[key], abs=1e-3), (split, key)
    from pykvsmooth.eval.opope import average

    for key, value in average(results).items():
        assert value == pytest.approx(expected["average"][key], abs=1e-3), key
