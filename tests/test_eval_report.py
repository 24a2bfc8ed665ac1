"""`kvsmooth-eval report`: the paper's Tables 1, 2 and 4 for a run, and the precision-recall plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pykvsmooth.eval.__main__ import main
from pykvsmooth.eval.coco import EvalError, load_annotations
from pykvsmooth.eval.report import (
    PROTOCOL_NOTES,
    ReportOptions,
    evaluate_run,
    markdown_report,
    plot_precision_recall,
)

NLTK_DATA = Path(__file__).resolve().parent / "data" / "eval" / "nltk_data"
OPERA = ReportOptions(nltk_data=NLTK_DATA)

# Ground truth: image 1 {person, dog}, image 2 {cat} (the reference captions add nothing).
INSTANCES = {1: ["person", "dog"], 2: ["cat"]}
REFERENCES = {1: "A man with a dog.", 2: "A cat."}

# setting -> captions; by hand (mentions / hallucinated / covered per image; no caption
# repeats an object, so distinct objects = mentions; OPERA's extraction and the extended
# one agree on these words):
# baseline      1: man dog frisbee(X) 3/1/2   2: cat couch(X) 2/1/1
#               CHAIR_S 2/2 = 100, CHAIR_I 2/5 = 40, P 60, R 3/3 = 100,
#               F1 = 2*.6*1/1.6 = 75.0
# adaptive-0.5  1: man dog 2/0/2              2: cat couch(X) 2/1/1
#               CHAIR_S 1/2 = 50, CHAIR_I 1/4 = 25, P 75, R 100, F1 = 1.5/1.75 = 85.7
# adaptive-0.9  1: dog 1/0/1                  2: cat 1/0/1
#               CHAIR_S 0, CHAIR_I 0, P 100, R 2/3 = 66.7, F1 = (4/3)/(5/3) = 80.0
# fixed-0.5     only image 1 so far: man 1/0/1 (GT 2)
#               CHAIR_S 0, CHAIR_I 0, P 100, R 1/2 = 50, F1 = 1/1.5 = 66.7
CAPTIONS: dict[str, dict[int, str]] = {
    "fixed-0.5": {1: "A man."},
    "adaptive-0.9": {1: "A dog.", 2: "A cat."},
    "baseline": {1: "A man, a dog and a frisbee.", 2: "A cat on a couch."},
    "adaptive-0.5": {1: "A man and a dog.", 2: "A cat on a couch."},
}


def make_run(tmp: Path) -> Path:
    names = ["person", "dog", "cat"]
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in INSTANCES]
    (tmp / "instances.json").write_text(json.dumps({
        "images": images,
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "category_id": names.index(n) + 1}
            for i, objs in INSTANCES.items()
            for k, n in enumerate(objs)
        ],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }))
    (tmp / "captions.json").write_text(json.dumps({
        "images": images,
        "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in REFERENCES.items()],
    }))
    run = tmp / "run"
    run.mkdir()
    # the manifest as `generate` writes it (the keys the report reads); keys-0.9 is
    # listed but has no captions yet, so it is left out of the report
    settings = {name: {"file": f"{name}.jsonl"} for name in [*CAPTIONS, "keys-0.9"]}
    manifest = {
        "format": 1,
        "model": {"file": "llava-v1.5-7b.Q4_K_M.gguf", "sha256": "ab" * 32},
        "mmproj": {"file": "mmproj-model-f16.gguf", "sha256": "cd" * 32},
        "annotations": {
            "instances": str(tmp / "instances.json"),
            "captions": str(tmp / "captions.json"),
        },
        "images": {"n": 2, "seed": 0, "ids": [1, 2]},
        "generation": {"prompt": "Please describe the image in detail.", "max_tokens": 512},
        "settings": settings,
    }
    (run / "run.json").write_text(json.dumps(manifest))
    for name, caps in CAPTIONS.items():
        (run / f"{name}.jsonl").write_text(
            "".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in caps.items())
        )
    return run


TABLE_1 = """\
Table 1. CHAIR (protocol `opera`: OPERA `chair.py` objects (NLTK), precision and F1 over \
distinct objects as PAI / MiddleLayer: the paper's).

| Method | CHAIR_S ↓ | F1 ↑ |
| --- | ---: | ---: |
| Baseline | 100.0 | 75.0 |
| KVSmooth (λref = 0.5) | 50.0 | 85.7 |
| KVSmooth (λref = 0.9) | 0.0 | 80.0 |
| KVSmooth w/o Ada. (λ = 0.5) | 0.0 | 66.7 |
"""

DETAILS = """\
| Method | CHAIR_S | CHAIR_I | Precision | Recall | F1 | Captions |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| Baseline | 100.0 | 40.0 | 60.0 | 100.0 | 75.0 | 2/2 |
| KVSmooth (λref = 0.5) | 50.0 | 25.0 | 75.0 | 100.0 | 85.7 | 2/2 |
| KVSmooth (λref = 0.9) | 0.0 | 0.0 | 100.0 | 66.7 | 80.0 | 2/2 |
| KVSmooth w/o Ada. (λ = 0.5) | 0.0 | 0.0 | 100.0 | 50.0 | 66.7 | 1/2 |
"""


def test_markdown_tables(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    annotations = load_annotations(tmp_path / "instances.json", tmp_path / "captions.json")
    for options in (OPERA, ReportOptions(chair_protocol="extended")):
        rows = evaluate_run(run, annotations, options)
        text = markdown_report(rows, options=options)
        assert TABLE_1.replace(
            "protocol `opera`: OPERA `chair.py` objects (NLTK), precision and F1 over "
            "distinct objects as PAI / MiddleLayer: the paper's",
            PROTOCOL_NOTES[options.chair_protocol],
        ) in text
        assert DETAILS in text
        assert text.startswith(f"Protocols. CHAIR: {PROTOCOL_NOTES[options.chair_protocol]}.")
        assert "Table 2" not in text and "Table 4" not in text  # no OPOPE asked, no keys run


# keys-0.9: image 1 "A dog and a frisbee." 2/1/1, image 2 "A cat." 1/0/1
#   CHAIR_S 1/2 = 50, P 2/3, R 2/3, F1 66.7
TABLE_4 = """\
| Method | C_S ↓ | F1 ↑ |
| --- | ---: | ---: |
| Key (K_t), λref = 0.9 | 50.0 | 66.7 |
| Key-Value (K_t, V_t), λref = 0.5 | 50.0 | 85.7 |
| Key-Value (K_t, V_t), λref = 0.9 | 0.0 | 80.0 |
"""
# OPOPE: no image of this run has HALC's 3 objects, so Table 2 reads POPE-style question
# files written here: image 1 dog yes, cat no; image 2 cat yes, person no (HALC's rule:
# "person" is not in "A man ..."). Baseline and adaptive-0.9 both: dog TP, cat TN, cat TP,
# person TN -> 100 everywhere. (fixed-0.5 has no caption of image 2, which would be an
# error, so the other settings' files are removed first.)
TABLE_2 = """\
| Method | Acc ↑ | Pre ↑ | F_β ↑ |
| --- | ---: | ---: | ---: |
| Baseline | 100.00 | 100.00 | 100.00 |
"""


def test_tables_2_and_4(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    (run / "keys-0.9.jsonl").write_text(
        json.dumps({"image_id": 1, "caption": "A dog and a frisbee."}) + "\n"
        + json.dumps({"image_id": 2, "caption": "A cat."}) + "\n"
    )
    rc = main(["report", str(run), "--nltk-data", str(NLTK_DATA)])
    assert rc == 0
    out = capsys.readouterr().out
    assert TABLE_4 in out
    # Table 1 does not list the keys-only ablation
    assert "| KVSmooth, keys only" not in out.split("Table 4")[0].split("All CHAIR")[0]

    questions = []
    for split in ("random", "popular", "adversarial"):
        q = tmp_path / f"{split}.json"
        q.write_text("".join(
            json.dumps({"image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a {o} in the image?",
                        "label": label}) + "\n"
            for i, o, label in [(1, "dog", "yes"), (1, "cat", "no"), (2, "cat", "yes"),
                                (2, "person", "no")]
        ))
        questions.append(str(q))
    for name in ("fixed-0.5", "adaptive-0.5", "keys-0.9"):
        (run / f"{name}.jsonl").unlink()
    rc = main(["report", str(run), "--nltk-data", str(NLTK_DATA), "--opope",
               "--questions", *questions])
    assert rc == 0
    out = capsys.readouterr().out
    assert "OPOPE: protocol `halc`: HALC's answer rule on POPE's question files." in out
    assert "Table 2. OPOPE (protocol `halc`" in out
    assert TABLE_2 in out
    assert "| KVSmooth (λref = 0.9) | 100.00 | 100.00 | 100.00 |" in out


def test_cli_uses_the_recorded_annotations(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    assert main(["report", str(run), "--nltk-data", str(NLTK_DATA)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Model `llava-v1.5-7b.Q4_K_M.gguf`")
    assert "2 COCO images (seed 0)" in out
    assert TABLE_1 in out


def test_cli_writes_markdown_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the optional 'plot' extra
    run = make_run(tmp_path)
    md, png = tmp_path / "report.md", tmp_path / "pr.png"
    assert main(["report", str(run), "--output", str(md), "--plot", str(png),
                 "--protocol", "extended"]) == 0
    assert "| KVSmooth (λref = 0.5) | 50.0 | 85.7 |" in md.read_text(encoding="utf-8")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path)
    annotations = load_annotations(tmp_path / "instances.json", tmp_path / "captions.json")
    rows = evaluate_run(run, annotations, ReportOptions(chair_protocol="extended"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(EvalError, match=r"pykvsmooth\[plot\]"):
        plot_precision_recall(rows, tmp_path / "pr.png")


def test_run_without_captions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    for f in run.glob("*.jsonl"):
        f.unlink()
    assert main(["report", str(run), "--protocol", "extended"]) == 1
    assert "no captions yet" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "run.json: no such file" in capsys.readouterr().err
