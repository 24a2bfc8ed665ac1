"""OPOPE with ``--protocol extended``: probe sets built by hand-checked rules, and metrics
computed by hand. HALC's protocol (the default) is in test_eval_halc.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from pykvsmooth.eval.__main__ import main
from pykvsmooth.eval.coco import CaptionRecord, EvalError, load_annotations
from pykvsmooth.eval.opope import (
    STRATEGIES,
    Probe,
    build_probes,
    evaluate_opope,
    f_beta,
    score_probes,
)


def objs(*names: str) -> frozenset[str]:
    return frozenset(names)


def negatives(probes: Sequence[Probe]) -> list[tuple[int, str]]:
    return [(p.image_id, p.category) for p in probes if not p.present]


def write_instances(tmp: Path, images: dict[int, Sequence[str]]) -> Path:
    names = sorted({n for o in images.values() for n in o})
    cat_id = {n: k + 1 for k, n in enumerate(names)}
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in images],
        "annotations": [
            {"id": 100 * i + k, "image_id": i, "category_id": cat_id[n]}
            for i, o in images.items()
            for k, n in enumerate(o)
        ],
        "categories": [{"id": cat_id[n], "name": n} for n in names],
    }
    path = tmp / "instances.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------- which objects are probed

# Eight images with two objects each (num_samples = 2, so every object is a positive, in
# name order), and one with a single object, which is not probed at all.
#   frequency over the probed images: dog 4, person 4, car 3, frisbee 3, cat 2
#   co-occurrence: person: car 2, cat 1, dog 1      dog: frisbee 2, cat 1, person 1
#                  car: person 2, frisbee 1         frisbee: dog 2, car 1
#                  cat: dog 1, person 1
STRATEGY_SET = {
    1: objs("dog", "person"),
    2: objs("car", "person"),
    3: objs("car", "person"),
    4: objs("dog", "frisbee"),
    5: objs("dog", "frisbee"),
    6: objs("car", "frisbee"),
    7: objs("cat", "person"),
    8: objs("cat", "dog"),
    9: objs("person"),
}


def test_popular_negatives_are_the_most_frequent_absent_objects() -> None:
    # ranking dog, person (4; ties by name), car, frisbee (3), cat (2); per image the first
    # two that are not in it
    probes = build_probes(STRATEGY_SET, "popular", num_samples=2, seed=0)
    assert negatives(probes) == [
        (1, "car"), (1, "frisbee"),
        (2, "dog"), (2, "frisbee"),
        (3, "dog"), (3, "frisbee"),
        (4, "person"), (4, "car"),
        (5, "person"), (5, "car"),
        (6, "dog"), (6, "person"),
        (7, "dog"), (7, "car"),
        (8, "person"), (8, "car"),
    ]


def test_adversarial_negatives_co_occur_most_with_their_positive() -> None:
    # image 1: dog -> frisbee (2); person -> car (2)
    # image 2/3: car -> person is present, frisbee (1); person -> car present, cat (1, by name)
    # image 4/5: dog -> frisbee present, cat (1, by name); frisbee -> dog present, car (1)
    # image 6: car -> person (2); frisbee -> dog (2)
    # image 7: cat -> dog (1, by name); person -> car (2)
    # image 8: cat -> person (dog present); dog -> frisbee (2)
    probes = build_probes(STRATEGY_SET, "adversarial", num_samples=2, seed=0)
    assert negatives(probes) == [
        (1, "frisbee"), (1, "car"),
        (2, "frisbee"), (2, "cat"),
        (3, "frisbee"), (3, "cat"),
        (4, "cat"), (4, "car"),
        (5, "cat"), (5, "car"),
        (6, "person"), (6, "dog"),
        (7, "dog"), (7, "car"),
        (8, "person"), (8, "frisbee"),
    ]


def test_probe_layout_and_random_negatives() -> None:
    for strategy in STRATEGIES:
        probes = build_probes(STRATEGY_SET, strategy, num_samples=2, seed=0)
        assert len(probes) == 8 * 4  # image 9 has too few objects
        assert [p.present for p in probes] == [True, False] * 16
        for image_id, image_objs in STRATEGY_SET.items():
            mine = [p for p in probes if p.image_id == image_id]
            if image_id == 9:
                assert mine == []
                continue
            assert {p.category for p in mine if p.present} == image_objs
            neg = [p.category for p in mine if not p.present]
            assert len(set(neg)) == 2 and not set(neg) & image_objs
    # random: seeded, so the same seed gives the same probes
    assert build_probes(STRATEGY_SET, "random", 2, seed=5) == build_probes(
        STRATEGY_SET, "random", 2, seed=5
    )
    # and one image's probes do not depend on the other images (image 1 alone would have
    # a different pool, so compare with a set that keeps the pool: drop image 3 only)
    fewer = {k: v for k, v in STRATEGY_SET.items() if k != 3}
    a = [p for p in build_probes(STRATEGY_SET, "random", 2, seed=1) if p.image_id == 1]
    b = [p for p in build_probes(fewer, "random", 2, seed=1) if p.image_id == 1]
    assert a == b


def test_not_enough_objects_for_negatives() -> None:
    # two images with the same two objects: nothing is left to be a negative
    with pytest.raises(EvalError):
        build_probes({1: objs("cat", "dog"), 2: objs("cat", "dog")}, "random", 2)


# ---------------------------------------------------------------- the metrics by hand

# A cycle of four images over four objects with num_samples = 2: each image's positives
# are its two objects and its negatives are the other two, whatever the strategy (random,
# popular and adversarial all have only those two to choose from). Image 5 has one object
# and is not probed.
METRIC_IMAGES = {
    1: ["person", "dog"],
    2: ["dog", "car"],
    3: ["car", "cat"],
    4: ["cat", "person"],
    5: ["person"],
}
# caption                                       positives         negatives
# 1 "A man with his dog and a cat."              person TP, dog TP  car TN, cat FP
# 2 "A puppy."                                   dog TP, car FN     person TN, cat TN
# 3 "A cat on a car parked by a bus."            car TP, cat TP     person TN, dog TN
#                                                (the bus is not probed)
# 4 "A kitten on a sofa."                        cat TP, person FN  dog TN, car TN
# 5 "A woman."                                   not probed
METRIC_CAPTIONS = {
    1: "A man with his dog and a cat.",
    2: "A puppy.",
    3: "A cat on a car parked by a bus.",
    4: "A kitten on a sofa.",
    5: "A woman.",
}
# TP 6, FP 1, TN 7, FN 2 (16 probes)
# accuracy  = 13/16 = 81.25 %
# precision = 6/7   = 85.7143 %
# recall    = 6/8   = 75 %
# F_0.2     = 1.04 * (6/7) * (3/4) / (0.04 * 6/7 + 3/4) = (9.36/14) / (5.49/7)
#           = 9.36 / 10.98 = 85.2459 %
EXPECTED = {"accuracy": 81.25, "precision": 600 / 7, "recall": 75.0, "F_beta": 93600 / 1098}


def test_f_beta() -> None:
    assert f_beta(6 / 7, 3 / 4, 0.2) == pytest.approx(9.36 / 10.98)
    assert f_beta(0.5, 0.5, 1.0) == pytest.approx(0.5)  # beta 1 is F1
    assert f_beta(0.0, 0.0) == 0.0


def test_hand_computed_metrics(tmp_path: Path) -> None:
    annotations = load_annotations(write_instances(tmp_path, METRIC_IMAGES))
    records = [CaptionRecord(i, c) for i, c in METRIC_CAPTIONS.items()]
    results = evaluate_opope(records, annotations, num_samples=2, seed=0)
    assert set(results) == set(STRATEGIES)
    for strategy, r in results.items():
        assert (r.tp, r.fp, r.tn, r.fn, r.n_images) == (6, 1, 7, 2, 4), strategy
        got = r.as_percent()
        for key, value in EXPECTED.items():
            assert got[key] == pytest.approx(value, abs=1e-4), (strategy, key)


def test_score_probes_counts() -> None:
    probes = [
        Probe(1, "dog", True),   # mentioned      TP
        Probe(1, "cat", False),  # mentioned      FP
        Probe(1, "car", True),   # not mentioned  FN
        Probe(1, "bus", False),  # not mentioned  TN
    ]
    r = score_probes(probes, {1: objs("dog", "cat")}, beta=0.2)
    assert (r.tp, r.fp, r.tn, r.fn) == (1, 1, 1, 1)
    assert (r.accuracy, r.precision, r.recall) == (0.5, 0.5, 0.5)
    assert r.f_beta == pytest.approx(0.5)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inst = write_instances(tmp_path, METRIC_IMAGES)
    caps = tmp_path / "caps.jsonl"
    lines = [json.dumps({"image_id": i, "caption": c}) for i, c in METRIC_CAPTIONS.items()]
    caps.write_text("\n".join(lines) + "\n")
    rc = main(["opope", str(caps), "--instances", str(inst), "--num-samples", "2",
               "--protocol", "extended"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    # the means over the splits at the top, then the splits
    assert list(out) == ["accuracy", "precision", "recall", "F_beta", *STRATEGIES]
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-4), key
        for name in STRATEGIES:
            assert out[name][key] == pytest.approx(value, abs=1e-4), (name, key)
    assert out["random"]["n_images"] == 4
    assert out["random"]["n_questions"] == 16


def test_cli_extended_refuses_halc_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inst = write_instances(tmp_path, METRIC_IMAGES)
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n")
    rc = main(["opope", str(caps), "--instances", str(inst), "--protocol", "extended",
               "--segmentation", str(inst)])
    assert rc == 1
    assert "--protocol halc" in capsys.readouterr().err
