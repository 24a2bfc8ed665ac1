"""`kvsmooth-eval generate`: sampling, manifest, resuming; and end to end on the tiny model.

The first tests use a stand-in captioner and need no native build. The end-to-end test
at the bottom needs the installed package (pykvsmooth with its libraries, Pillow, gguf)
and fails, not skips, when any of it is missing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import TinyLlava

from pykvsmooth.eval.__main__ import build_parser, main, settings_from_args
from pykvsmooth.eval.coco import EvalError, sample_image_ids
from pykvsmooth.eval.generate import (
    MANIFEST,
    GenerateOptions,
    KVSmoothParams,
    Setting,
    done_image_ids,
    run,
)

REPO = Path(__file__).resolve().parents[1]


def write_dataset(tmp: Path, n: int = 3) -> tuple[Path, Path, Path]:
    """n small JPEGs with instances/captions files that describe them."""
    from PIL import Image

    images = tmp / "val2014"
    images.mkdir()
    names = ["person", "dog", "car"]
    image_entries, instance_anns, caption_anns = [], [], []
    for k in range(n):
        image_id = 1000 + 7 * k
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        color = (40 * k % 256, 255 - 60 * k % 256, 120)
        Image.new("RGB", (64, 48), color).save(images / file_name, quality=90)
        image_entries.append({"id": image_id, "file_name": file_name, "width": 64, "height": 48})
        instance_anns.append({"id": k, "image_id": image_id, "category_id": k % 3 + 1})
        caption_anns.append({"id": k, "image_id": image_id, "caption": f"A {names[k % 3]}."})
    instances = tmp / "instances_val2014.json"
    instances.write_text(json.dumps({
        "images": image_entries,
        "annotations": instance_anns,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }))
    captions = tmp / "captions_val2014.json"
    captions.write_text(json.dumps({"images": image_entries, "annotations": caption_anns}))
    return images, instances, captions


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------- stand-in captioner


class FakeCaptioner:
    """Captions an image with its size; counts calls per setting."""

    calls: dict[str, int] = {}

    def __init__(self, setting: Setting, options: GenerateOptions) -> None:
        self.setting = setting
        FakeCaptioner.calls.setdefault(setting.name, 0)

    def caption(self, image: bytes, mime: str) -> tuple[str, int]:
        FakeCaptioner.calls[self.setting.name] += 1
        assert mime == "image/jpeg"
        return f"A dog in {len(image)} bytes ({self.setting.name}).", 7

    def describe(self) -> dict:
        return {"mode": self.setting.mode, "lambda_ref": self.setting.lambda_ref}

    def close(self) -> None:
        pass


@pytest.fixture()
def fake_run(tmp_path: Path):
    images, instances, captions = write_dataset(tmp_path, n=3)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"model")
    mmproj = tmp_path / "mmproj.gguf"
    mmproj.write_bytes(b"mmproj")
    FakeCaptioner.calls = {}

    def options(**kw) -> GenerateOptions:
        base = dict(
            model=model, mmproj=mmproj, images_dir=images, instances=instances,
            captions=captions, out_dir=tmp_path / "out", n_images=2, seed=3,
            settings=(Setting(), Setting("adaptive", 0.9), Setting("fixed", 0.5)),
        )
        base.update(kw)
        return GenerateOptions(**base)

    return options


def test_settings_parse_and_names() -> None:
    assert Setting.parse("baseline") == Setting()
    assert Setting.parse("adaptive:0.9") == Setting("adaptive", 0.9)
    assert Setting.parse("keys:0.9").name == "keys-0.9"
    assert Setting.from_name("fixed-0.5") == Setting("fixed", 0.5)
    assert Setting("fixed", 0.5).label == "KVSmooth w/o Ada. (λ = 0.5)"
    for bad in ("adaptive", "adaptive:x", "smooth:0.9", "adaptive:1.5"):
        with pytest.raises(EvalError):
            Setting.parse(bad)


def test_sample_is_seeded_and_order_independent() -> None:
    ids = list(range(100, 200))
    a = sample_image_ids(ids, 10, seed=1)
    assert a == sample_image_ids(list(reversed(ids)), 10, seed=1)
    assert len(set(a)) == 10 and set(a) <= set(ids)
    assert a != sample_image_ids(ids, 10, seed=2)
    with pytest.raises(EvalError):
        sample_image_ids(ids, 101, seed=1)


def test_run_writes_one_file_per_setting_and_a_manifest(fake_run, tmp_path: Path) -> None:
    manifest_path = run(fake_run(), factory=FakeCaptioner)
    manifest = json.loads(manifest_path.read_text())
    ids = manifest["images"]["ids"]
    assert len(ids) == 2 and (manifest["images"]["seed"], manifest["images"]["n"]) == (3, 2)
    assert ids == sample_image_ids([1000, 1007, 1014], 2, seed=3)
    assert manifest["model"]["file"] == "model.gguf"
    assert manifest["model"]["sha256"] == hashlib.sha256(b"model").hexdigest()
    assert manifest["mmproj"]["sha256"] == hashlib.sha256(b"mmproj").hexdigest()
    assert manifest["generation"]["prompt"] == "Please describe the image in detail."
    assert manifest["generation"]["max_tokens"] == 512
    assert set(manifest["settings"]) == {"baseline", "adaptive-0.9", "fixed-0.5"}
    assert manifest["settings"]["fixed-0.5"]["effective"] == {"mode": "fixed", "lambda_ref": 0.5}
    for name in manifest["settings"]:
        records = read_jsonl(tmp_path / "out" / f"{name}.jsonl")
        assert [r["image_id"] for r in records] == ids
        assert all(r["setting"] == name and r["n_tokens"] == 7 for r in records)
    assert FakeCaptioner.calls == {"baseline": 2, "adaptive-0.9": 2, "fixed-0.5": 2}


def test_run_resumes(fake_run, tmp_path: Path) -> None:
    run(fake_run(), factory=FakeCaptioner)
    out = tmp_path / "out" / "adaptive-0.9.jsonl"
    before = out.read_text()
    # a run killed while writing the second record leaves half a line behind
    first, second = before.splitlines()
    out.write_text(first + "\n" + second[:10])
    FakeCaptioner.calls = {}
    run(fake_run(), factory=FakeCaptioner)
    # only the lost caption was made again; the others were not touched
    assert FakeCaptioner.calls == {"adaptive-0.9": 1}
    assert out.read_text() == before
    # a new setting can be added to the run later
    run(fake_run(settings=(Setting("keys", 0.9),)), factory=FakeCaptioner)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert set(manifest["settings"]) == {"baseline", "adaptive-0.9", "fixed-0.5", "keys-0.9"}


def test_done_image_ids(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    assert done_image_ids(path) == set()
    path.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "cap')
    assert done_image_ids(path) == {1}
    assert path.read_text() == '{"image_id": 1, "caption": "a"}\n'


@pytest.mark.parametrize(
    "change",
    [
        {"n_images": 3},
        {"seed": 4},
        {"max_tokens": 100},
        {"prompt": "Describe."},
        {"kvsmooth": KVSmoothParams(queue=10)},
    ],
)
def test_run_refuses_to_mix_different_runs(fake_run, change) -> None:
    run(fake_run(), factory=FakeCaptioner)
    with pytest.raises(EvalError, match="differs"):
        run(fake_run(**change), factory=FakeCaptioner)


def test_run_refuses_another_model(fake_run, tmp_path: Path) -> None:
    run(fake_run(), factory=FakeCaptioner)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"other model")
    with pytest.raises(EvalError, match="model"):
        run(fake_run(model=other), factory=FakeCaptioner)


def parse_generate(*extra: str):
    return build_parser().parse_args(
        ["generate", "--model", "m", "--mmproj", "p", "--images", "i", "--instances", "j",
         "--out", "o", *extra]
    )


def test_kvsmooth_flags_are_the_other_tools_flags() -> None:
    # the spelling of kvsmooth-caption, the server and llama.cpp's common arguments
    args = parse_generate("--kvsmooth-window", "0.1", "--kvsmooth-queue", "9",
                          "--kvsmooth-layers", "2-30", "--settings", "baseline", "fixed:0.5")
    assert (args.kvsmooth_window, args.kvsmooth_queue, args.kvsmooth_layers) == (0.1, 9, (2, 30))
    assert settings_from_args(args) == (Setting(), Setting("fixed", 0.5))
    # the old spellings are gone
    for old in ("--window", "--queue", "--layer-start", "--layer-end"):
        with pytest.raises(SystemExit):
            parse_generate(old, "1")


@pytest.mark.parametrize(
    "extra, settings",
    [
        ((), (Setting(), Setting("adaptive", 0.9))),  # the paper's comparison
        (("--kvsmooth", "0.7"), (Setting(), Setting("adaptive", 0.7))),
        (("--kvsmooth", "0.5", "--kvsmooth-mode", "fixed"), (Setting(), Setting("fixed", 0.5))),
        (("--no-kvsmooth",), (Setting(),)),
        (("--kvsmooth", "0"), (Setting(),)),
        (("--settings", "keys:0.9"), (Setting("keys", 0.9),)),
    ],
)
def test_settings_from_the_kvsmooth_flags(extra, settings) -> None:
    assert settings_from_args(parse_generate(*extra)) == settings


def test_settings_and_kvsmooth_flags_conflict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(EvalError, match="one or the other"):
        settings_from_args(parse_generate("--settings", "baseline", "--kvsmooth", "0.5"))
    # bad KVSmooth values are refused before any file is read
    rc = main(["generate", "--model", "m", "--mmproj", "p", "--images", str(tmp_path),
               "--instances", "j", "--out", str(tmp_path / "o"), "--kvsmooth-queue", "0"])
    assert rc == 1
    assert "adaptive-0.9" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_errors_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["generate", "--model", str(tmp_path / "missing.gguf"), "--mmproj", "x",
               "--images", str(tmp_path), "--instances", "y", "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "missing.gguf: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end


def test_generate_end_to_end_on_the_tiny_model(tmp_path: Path, tiny_llava: TinyLlava) -> None:
    """Three images, baseline and KVSmooth, through pykvsmooth.Llama and the LLaVA handler."""
    import pykvsmooth  # noqa: F401  (the installed package with its native libraries)

    text_model = tiny_llava.text
    mmproj = tiny_llava.mmproj
    images, instances, captions = write_dataset(tmp_path, n=3)
    out = tmp_path / "run"
    argv = [
        "generate", "--model", str(text_model), "--mmproj", str(mmproj),
        "--images", str(images), "--instances", str(instances), "--captions", str(captions),
        "--out", str(out), "--n-images", "3", "--seed", "0",
        "--settings", "baseline", "adaptive:0.9", "keys:0.9",
        "--max-tokens", "12", "--n-ctx", "512", "--n-gpu-layers", "0",
        "--kvsmooth-window", "0.1", "--kvsmooth-queue", "7",
    ]
    assert main(argv) == 0

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"]["file"] == "tiny-llava-text.gguf"
    assert manifest["model"]["sha256"] == sha256(text_model)
    assert manifest["mmproj"]["sha256"] == sha256(mmproj)
    assert sorted(manifest["images"]["ids"]) == [1000, 1007, 1014]
    assert manifest["settings"]["adaptive-0.9"]["effective"]["lambda_ref"] == pytest.approx(0.9)
    assert manifest["settings"]["keys-0.9"]["effective"]["mode"] == "keys"
    # --kvsmooth-window / --kvsmooth-queue reach every KVSmooth setting
    for name in ("adaptive-0.9", "keys-0.9"):
        effective = manifest["settings"][name]["effective"]
        assert (effective["window"], effective["queue"]) == (pytest.approx(0.1), 7)
    assert manifest["settings"]["baseline"]["effective"] == {}
    files = {}
    for name in ("baseline", "adaptive-0.9", "keys-0.9"):
        files[name] = (out / f"{name}.jsonl").read_text()
        records = read_jsonl(out / f"{name}.jsonl")
        assert [r["image_id"] for r in records] == manifest["images"]["ids"]
        for r in records:
            assert isinstance(r["caption"], str)
            assert 0 <= r["n_tokens"] <= 12

    # a second run finds everything done and changes nothing
    assert main(argv) == 0
    for name, text in files.items():
        assert (out / f"{name}.jsonl").read_text() == text

    # greedy decoding: a fresh run of the baseline gives the same captions
    again = tmp_path / "again"
    argv_again = [a if a != str(out) else str(again) for a in argv]
    k = argv_again.index("--settings")
    argv_again[k + 1 : k + 4] = ["baseline"]
    assert main(argv_again) == 0
    captions_again = [r["caption"] for r in read_jsonl(again / "baseline.jsonl")]
    assert captions_again == [r["caption"] for r in read_jsonl(out / "baseline.jsonl")]

    # the caption files are what `chair` reads
    assert main(["chair", str(out / "adaptive-0.9.jsonl"), "--instances", str(instances),
                 "--captions", str(captions), "--protocol", "extended"]) == 0
