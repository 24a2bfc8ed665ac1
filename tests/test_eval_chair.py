"""CHAIR with ``--protocol extended``: its object extraction (synonyms, plurals, multi-word
names) and hand-computed metrics. The reference protocol (``opera``) is in test_eval_opera.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from pykvsmooth.eval.__main__ import main
from pykvsmooth.eval.chair import ObjectExtractor, compute_chair, pluralize, tokenize
from pykvsmooth.eval.coco import CaptionRecord, EvalError, load_annotations
from pykvsmooth.eval.synonyms import COCO_SYNONYMS

# The 80 category names of instances_val2014.json, in category-id order.
COCO_80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)


def write_coco(
    tmp: Path,
    images: dict[int, tuple[Sequence[str], Sequence[str]]],
) -> tuple[Path, Path]:
    """instances/captions files: image id -> (instance category names, reference captions)."""
    names = sorted({n for objs, _ in images.values() for n in objs})
    cat_id = {n: k + 1 for k, n in enumerate(names)}
    instances = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in images],
        "annotations": [
            {"id": 100 * i + k, "image_id": i, "category_id": cat_id[n]}
            for i, (objs, _) in images.items()
            for k, n in enumerate(objs)
        ],
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "x"} for n in names],
    }
    captions = {
        "images": instances["images"],
        "annotations": [
            {"id": 100 * i + k, "image_id": i, "caption": c}
            for i, (_, refs) in images.items()
            for k, c in enumerate(refs)
        ],
    }
    inst_path, cap_path = tmp / "instances.json", tmp / "captions.json"
    inst_path.write_text(json.dumps(instances))
    cap_path.write_text(json.dumps(captions))
    return inst_path, cap_path


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def extractor() -> ObjectExtractor:
    return ObjectExtractor()


def found(extractor: ObjectExtractor, text: str) -> list[tuple[str, str]]:
    return [(m.words, m.category) for m in extractor.mentions(text)]


# ---------------------------------------------------------------- the synonym table


def test_table_covers_exactly_the_80_categories(extractor: ObjectExtractor) -> None:
    assert len(set(COCO_80)) == 80
    assert set(COCO_SYNONYMS) == set(COCO_80)
    for name in COCO_80:
        # every category name is its own first synonym and is found as itself
        assert COCO_SYNONYMS[name][0] == name
        assert found(extractor, f"there is a {name} here") == [(name, name)]


@pytest.mark.parametrize(
    "word, plural",
    [
        ("dog", "dogs"), ("bus", "buses"), ("glass", "glasses"), ("bench", "benches"),
        ("toothbrush", "toothbrushes"), ("puppy", "puppies"), ("toy", "toys"),
        ("woman", "women"), ("policeman", "policemen"), ("human", "humans"),
        ("knife", "knives"), ("mouse", "mice"), ("child", "children"), ("sheep", "sheep"),
        ("person", "people"), ("ox", "oxen"),
    ],
)
def test_pluralize(word: str, plural: str) -> None:
    assert pluralize(word) == plural


def test_tokenize_lowercases_drops_possessives_and_splits_hyphens() -> None:
    words = tokenize("The Dog's HOT-DOG, isn’t it?")
    assert words == ["the", "dog", "hot", "dog", "isn", "t", "it"]


@pytest.mark.parametrize(
    "text, expected",
    [
        # synonyms of person, in singular and plural, each occurrence a mention
        ("A man, two women and three children.",
         [("man", "person"), ("women", "person"), ("children", "person")]),
        ("People and a boy.", [("people", "person"), ("boy", "person")]),
        ("Two bikes and a motorbike.", [("bikes", "bicycle"), ("motorbike", "motorcycle")]),
        ("A jet, two planes and an airplane.",
         [("jet", "airplane"), ("planes", "airplane"), ("airplane", "airplane")]),
        ("A TV and a television.", [("tv", "tv"), ("television", "tv")]),
        ("A laptop and a notebook computer.",
         [("laptop", "laptop"), ("notebook computer", "laptop")]),
        ("Puppies and kittens.", [("puppies", "dog"), ("kittens", "cat")]),
        ("Mice and knives.", [("mice", "mouse"), ("knives", "knife")]),
        ("A sofa with a fridge.", [("sofa", "couch"), ("fridge", "refrigerator")]),
    ],
)
def test_synonyms_and_plurals(extractor: ObjectExtractor, text: str, expected) -> None:
    assert found(extractor, text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # a two-word name is one object, never its last word's object
        ("Two hot dogs.", [("hot dogs", "hot dog")]),
        ("A hot-dog and a dog.", [("hot dog", "hot dog"), ("dog", "dog")]),
        ("Teddy bears on a bed.", [("teddy bears", "teddy bear"), ("bed", "bed")]),
        ("Her cell phone.", [("cell phone", "cell phone")]),
        ("A fire hydrant by a stop sign.",
         [("fire hydrant", "fire hydrant"), ("stop sign", "stop sign")]),
        ("Parking meters and traffic lights.",
         [("parking meters", "parking meter"), ("traffic lights", "traffic light")]),
        ("A baseball bat, a baseball glove and a tennis racket.",
         [("baseball bat", "baseball bat"), ("baseball glove", "baseball glove"),
          ("tennis racket", "tennis racket")]),
        ("Wine glasses on a dining table.",
         [("wine glasses", "wine glass"), ("dining table", "dining table")]),
        ("Potted plants and a hair dryer.",
         [("potted plants", "potted plant"), ("hair dryer", "hair drier")]),
        ("A double decker bus.", [("double decker bus", "bus")]),
    ],
)
def test_multi_word_objects(extractor: ObjectExtractor, text: str, expected) -> None:
    assert found(extractor, text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # qualifiers are not people: a baby elephant is one elephant
        ("A baby elephant and its mother.", [("baby elephant", "elephant"), ("mother", "person")]),
        ("A baby holding a baby bird.", [("baby", "person"), ("baby bird", "bird")]),
        ("A passenger train.", [("passenger train", "train")]),
        # phrases that name no object
        ("Train tracks near home plate.", []),
        # with a toilet around, the seat is the toilet's
        ("A toilet with the seat up.", [("toilet", "toilet")]),
        ("A seat in a bus.", [("seat", "chair"), ("bus", "bus")]),
        ("A toilet seat.", [("toilet seat", "toilet")]),
        # whole words only
        ("Carrots scattered in a catalog about cars.", [("carrots", "carrot"), ("cars", "car")]),
        ("The dog's bowl.", [("dog", "dog"), ("bowl", "bowl")]),
    ],
)
def test_special_cases(extractor: ObjectExtractor, text: str, expected) -> None:
    assert found(extractor, text) == expected


# ---------------------------------------------------------------- the metrics by hand

# Ground truth = instance labels + objects of the reference captions.
#   image 1: instances {person, dog}; reference "A man walks his dog near a bench."
#            adds bench                                    -> GT {person, dog, bench}   (3)
#   image 2: instances {cat}; reference "A kitten sleeping on a couch." adds couch
#                                                          -> GT {cat, couch}           (2)
#   image 3: instances {car, traffic light}; reference "Cars stopped at a red light."
#            adds nothing new ("light" alone is no object) -> GT {car, traffic light}   (2)
IMAGES = {
    1: (["person", "dog"], ["A man walks his dog near a bench."]),
    2: (["cat"], ["A kitten sleeping on a couch."]),
    3: (["car", "traffic light"], ["Cars stopped at a red light."]),
}
# Generated captions:
#   1: woman(person) man(person) dogs(dog) fire hydrant(X)   4 mentions, 1 hallucinated,
#      covers {person, dog}                                   -> hallucinated caption
#   2: cat sofa(couch) laptop(X) teddy bear(X)                4 mentions, 2 hallucinated,
#      covers {cat, couch}                                    -> hallucinated caption
#   3: cars(car) traffic lights(traffic light)                2 mentions, 0 hallucinated,
#      covers {car, traffic light}
CAPTIONS = {
    1: "A woman and a man walk two dogs past a fire hydrant.",
    2: "A cat lies on a sofa next to a laptop and a teddy bear.",
    3: "Several cars wait at traffic lights.",
}
# Distinct objects per caption: 1 {person, dog, fire hydrant}, 2 {cat, couch, laptop,
# teddy bear}, 3 {car, traffic light}: 9 generated, 6 of them covered.
# CHAIR_S   = 2 hallucinated captions / 3 captions         = 66.6667 %
# CHAIR_I   = 3 hallucinated mentions / 10 mentions        = 30 %
# recall    = (2 + 2 + 2) covered / (3 + 2 + 2) GT objects = 6/7 = 85.7143 %
# precision = 6 covered / 9 distinct generated objects     = 66.6667 %  (PAI / MiddleLayer)
# F1        = 2 * 2/3 * 6/7 / (2/3 + 6/7) = (8/7) / (32/21) = 0.75     = 75 %
# mention precision = 7 correct mentions / 10 mentions     = 70 %  (= 1 - CHAIR_I)
EXPECTED = {
    "CHAIR_S": 200 / 3,
    "CHAIR_I": 30.0,
    "recall": 600 / 7,
    "precision": 200 / 3,
    "F1": 75.0,
}


def test_hand_computed_metrics(tmp_path: Path, extractor: ObjectExtractor) -> None:
    inst, caps = write_coco(tmp_path, IMAGES)
    annotations = load_annotations(inst, caps)
    records = [CaptionRecord(i, c) for i, c in CAPTIONS.items()]
    result = compute_chair(records, annotations, extractor)
    assert (result.n_captions, result.n_mentions, result.n_hallucinated_mentions) == (3, 10, 3)
    assert (result.n_hallucinated_captions, result.n_ground_truth, result.n_covered) == (2, 7, 6)
    assert result.n_distinct_generated == 9
    assert result.mention_precision == pytest.approx(0.7)
    got = result.as_percent()
    assert list(got) == ["CHAIR_S", "CHAIR_I", "recall", "precision", "F1"]
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key


def test_repeated_mentions_count_once_for_precision(tmp_path: Path) -> None:
    # "A dog, a dog, a dog and a cat." on image 1 (GT person, dog, bench): mentions dog x3
    # and cat; distinct {dog, cat}, covered {dog}: precision 1/2 = 50 %, while the
    # mention-based one is 3/4 = 75 % (1 - CHAIR_I); recall 1/3.
    inst, caps = write_coco(tmp_path, IMAGES)
    result = compute_chair(
        [CaptionRecord(1, "A dog, a dog, a dog and a cat.")], load_annotations(inst, caps),
        ObjectExtractor(),
    )
    assert result.precision == pytest.approx(0.5)
    assert result.mention_precision == pytest.approx(0.75)
    assert result.chair_i == pytest.approx(0.25)
    assert result.f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_ground_truth_without_reference_captions_is_the_instances(tmp_path: Path) -> None:
    # Without the captions file, image 1's bench is a hallucination: the caption
    # "A dog on a bench." has 2 mentions, 1 hallucinated; recall = 1 of {person, dog}.
    inst, _ = write_coco(tmp_path, IMAGES)
    annotations = load_annotations(inst)
    result = compute_chair([CaptionRecord(1, "A dog on a bench.")], annotations)
    assert result.as_percent()["CHAIR_S"] == 100.0
    assert result.chair_i == pytest.approx(0.5)
    assert result.recall == pytest.approx(0.5)


def test_caption_without_objects(tmp_path: Path) -> None:
    # No mentions: CHAIR_I and precision are 0 by definition (0/0), nothing hallucinated,
    # recall 0 of 2, F1 0.
    inst, caps = write_coco(tmp_path, IMAGES)
    result = compute_chair([CaptionRecord(2, "A blurry picture.")], load_annotations(inst, caps))
    assert (result.chair_s, result.chair_i, result.precision, result.recall, result.f1) == (
        0.0, 0.0, 0.0, 0.0, 0.0,
    )


def test_cli_prints_the_metrics_as_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inst, caps = write_coco(tmp_path, IMAGES)
    # extra keys in the records are ignored
    captions = write_jsonl(
        tmp_path / "caps.jsonl",
        [{"image_id": i, "caption": c, "setting": "baseline"} for i, c in CAPTIONS.items()],
    )
    details = tmp_path / "details.jsonl"
    rc = main(["chair", str(captions), "--instances", str(inst), "--captions", str(caps),
               "--protocol", "extended", "--per-caption", str(details), "--counts"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-4), key
    # the mention-based precision under its own key; the counts on request
    assert out["mention_precision"] == pytest.approx(70.0)
    assert (out["n_mentions"], out["n_distinct_generated"], out["n_covered"]) == (10, 9, 6)
    lines = [json.loads(line) for line in details.read_text().splitlines()]
    assert lines[1]["hallucinated"] == [["laptop", "laptop"], ["teddy bear", "teddy bear"]]
    assert lines[0]["ground_truth"] == ["bench", "dog", "person"]


def test_cli_rejects_unknown_images_and_repeated_images(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inst, caps = write_coco(tmp_path, IMAGES)
    extended = ["--protocol", "extended"]
    unknown = write_jsonl(tmp_path / "a.jsonl", [{"image_id": 99, "caption": "A dog."}])
    assert main(["chair", str(unknown), "--instances", str(inst), "--captions", str(caps),
                 *extended]) == 1
    assert "image_id 99" in capsys.readouterr().err
    twice = write_jsonl(
        tmp_path / "b.jsonl",
        [{"image_id": 1, "caption": "A dog."}, {"image_id": 1, "caption": "A cat."}],
    )
    assert main(["chair", str(twice), "--instances", str(inst), "--captions", str(caps),
                 *extended]) == 1
    assert "appears twice" in capsys.readouterr().err


def test_empty_caption_file_is_an_error(tmp_path: Path) -> None:
    inst, caps = write_coco(tmp_path, IMAGES)
    with pytest.raises(EvalError):
        compute_chair([], load_annotations(inst, caps))
