"""``kvsmooth-caption`` end to end on the tiny LLaVA fixture: a folder of three good images in
nested folders and one corrupt file; JSONL records, sidecars, resume, --overwrite, --compare,
exit codes and Ctrl-C. The tool runs as ``python -m pykvsmooth.caption`` (the installed
package), as the console script does."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import make_tiny_llava
import pytest
from conftest import TinyLlava

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
GOOD = ("one.png", "sub/two.jpg", "sub/deeper/three.webp")
CORRUPT = "sub/broken.png"


@pytest.fixture(scope="module")
def models(tiny_llava: TinyLlava) -> Dict[str, Path]:
    return {"model": tiny_llava.text, "mmproj": tiny_llava.mmproj}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_tiny_llava.write_test_image(path, size=(64, 48), seed=seed)


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for seed, name in enumerate(GOOD):
        write_image(root / name, seed)
    write_corrupt(root / CORRUPT)
    (root / "sub" / "notes.md").write_text("not an image\n")
    return root


def caption(models: Dict[str, Path], *args: object, cwd: Path, env: Dict[str, str] | None = None,
            with_model: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pykvsmooth.caption", *map(str, args), "--max-tokens", "24", "--quiet"]
    if with_model:
        cmd += ["--model", str(models["model"]), "--mmproj", str(models["mmproj"])]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env if env is not None else os.environ.copy())


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def by_name(records: List[dict], root: Path) -> Dict[str, dict]:
    return {Path(r["path"]).resolve().relative_to(root.resolve()).as_posix(): r for r in records}


def test_folder_with_corrupt_file_then_resume(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "captions.jsonl"
    first = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # some images failed
    assert "3 captioned, 0 already done, 1 failed" in first.stderr
    assert f"failed: {photos / CORRUPT}: cannot read image" in first.stderr

    records = by_name(read_jsonl(out), photos)
    assert sorted(records) == sorted([*GOOD, CORRUPT])  # notes.md is not an image
    assert "cannot read image" in records[CORRUPT]["error"] and "caption" not in records[CORRUPT]
    for name in GOOD:
        r = records[name]
        assert "error" not in r and r["caption"], r
        assert r["settings"]["kvsmooth"]["lambda_ref"] == pytest.approx(0.9)
        assert r["settings"]["prompt"] == "Please describe the image in detail."
        assert r["settings"]["max_tokens"] == 24 and r["settings"]["temperature"] == 0
        assert r["timings"]["completion_tokens"] > 0 and r["timings"]["seconds"] > 0
        assert (photos / name).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"] + "\n"
    assert not (photos / CORRUPT).with_suffix(".txt").exists()

    # resume: nothing is captioned again, and no file is touched
    mtimes = {n: (photos / n).with_suffix(".txt").stat().st_mtime_ns for n in GOOD}
    again = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    assert "0 captioned, 3 already done, 1 failed" in again.stderr
    assert by_name(read_jsonl(out), photos) == records  # one record per image, still
    assert {n: (photos / n).with_suffix(".txt").stat().st_mtime_ns for n in GOOD} == mtimes

    # the corrupt file is repaired: only it is captioned, and the run succeeds
    write_image(photos / CORRUPT, seed=7)
    fixed = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "1 captioned, 3 already done, 0 failed" in fixed.stderr
    records = by_name(read_jsonl(out), photos)
    assert len(read_jsonl(out)) == 4 and "caption" in records[CORRUPT]
    assert (photos / CORRUPT).with_suffix(".txt").exists()

    # a sidecar deleted by hand is written back from the JSONL, without the model
    (photos / GOOD[0]).with_suffix(".txt").unlink()
    restored = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert restored.returncode == 0 and "0 captioned, 4 already done" in restored.stderr
    assert (photos / GOOD[0]).with_suffix(".txt").read_text(encoding="utf-8") == records[GOOD[0]]["caption"] + "\n"


def test_existing_captions_are_kept_unless_overwrite(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    mine = (photos / GOOD[1]).with_suffix(".txt")
    mine.write_text("my own caption\n")
    out = tmp_path / "c.jsonl"
    run = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert mine.read_text() == "my own caption\n"
    model_caption = by_name(read_jsonl(out), photos)[GOOD[1]]["caption"]

    over = caption(models, photos, "--out", out, "--sidecar", "--overwrite", cwd=tmp_path)
    assert over.returncode == 1, over.stderr
    assert "3 captioned, 0 already done, 1 failed" in over.stderr
    assert mine.read_text(encoding="utf-8") == model_caption + "\n"  # greedy: the same caption
    assert len(read_jsonl(out)) == 4  # replaced, not appended


def test_sidecars_only_resume_and_baseline(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    (photos / CORRUPT).unlink()
    first = caption(models, photos, "--sidecar", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "3 captioned, 0 already done, 0 failed" in first.stderr
    smoothed = {n: (photos / n).with_suffix(".txt").read_text(encoding="utf-8") for n in GOOD}
    again = caption(models, photos, "--sidecar", cwd=tmp_path)
    assert "0 captioned, 3 already done" in again.stderr

    base = caption(models, photos, "--sidecar", "--overwrite", "--no-kvsmooth", cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    baseline = {n: (photos / n).with_suffix(".txt").read_text(encoding="utf-8") for n in GOOD}
    assert baseline != smoothed


def test_compare_html(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    page = tmp_path / "report" / "compare.html"
    out = tmp_path / "c.jsonl"
    run = caption(models, photos / "**" / "*.*", "--compare", page, "--out", out, cwd=tmp_path)
    assert run.returncode == 1, run.stderr  # the corrupt file is among the matches
    text = page.read_text(encoding="utf-8")
    records = [r for r in read_jsonl(out) if "error" not in r]
    assert len(records) == 3
    assert text.count("<img src=\"data:image/jpeg;base64,") == 3
    assert any(r["caption"] != r["baseline_caption"] for r in records)
    for r in records:
        assert html.escape(r["caption"]) in text and html.escape(r["baseline_caption"]) in text
        assert r["baseline_timings"]["completion_tokens"] > 0
    # the comparison needs KVSmooth on
    bad = caption(models, photos, "--compare", page, "--no-kvsmooth", cwd=tmp_path)
    assert bad.returncode == 2 and "--compare" in bad.stderr


def test_model_from_environment_and_usage_errors(models: Dict[str, Path], tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", seed=1)
    env = dict(os.environ, PYKVSMOOTH_MODEL=str(models["model"]), LLAMA_ARG_MMPROJ=str(models["mmproj"]))
    env.pop("PYKVSMOOTH_MMPROJ", None)
    ok = caption(models, "a.png", "--out", "a.jsonl", cwd=tmp_path, env=env, with_model=False)
    assert ok.returncode == 0, ok.stderr
    assert read_jsonl(tmp_path / "a.jsonl")[0]["path"] == "a.png"

    env = {k: v for k, v in os.environ.items() if k not in
           ("PYKVSMOOTH_MODEL", "LLAMA_ARG_MODEL", "PYKVSMOOTH_MMPROJ", "LLAMA_ARG_MMPROJ")}
    missing = caption(models, "a.png", "--out", "b.jsonl", cwd=tmp_path, env=env, with_model=False)
    assert missing.returncode == 2 and "--model and --mmproj are required" in missing.stderr
    for args, message in (((), "nothing to write"),
                          (("--out", "c.jsonl", "--kvsmooth", "1.5"), "lambda_ref must be in [0, 1]"),
                          (("--out", "c.jsonl", "--kvsmooth-layers", "3"), "expected START-END")):
        bad = caption(models, "a.png", *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    nothing = caption(models, "nope/*.jpg", "a.png", "--out", "d.jsonl", cwd=tmp_path)
    assert nothing.returncode == 1 and "failed: nope/*.jpg: no such file" in nothing.stderr
    refused = caption(models, "a.png", "--out", "e.jsonl", "--kvsmooth-layers", "2-40", cwd=tmp_path)
    assert refused.returncode == 1 and "layer range" in refused.stderr


def test_ctrl_c_keeps_finished_captions(models: Dict[str, Path], tmp_path: Path) -> None:
    # enough images that the run is still going when the test, maybe starved of CPU on a
    # loaded machine, gets to send the interrupt
    n_images = 150
    folder = tmp_path / "many"
    for i in range(n_images):
        write_image(folder / f"img{i:03d}.png", seed=i)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "pykvsmooth.caption", str(folder), "--out", str(out), "--sidecar",
           "--max-tokens", "200", "--quiet", "--model", str(models["model"]), "--mmproj", str(models["mmproj"])]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted:" in stderr
    records = read_jsonl(out)  # every line is valid JSON
    assert 2 <= len(records) < n_images
    for r in records:
        assert Path(r["path"]).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"] + "\n"
    assert len(list(folder.glob("*.txt"))) == len(records)
    # and the rest is done by the next run (three of the rest, to keep the test short)
    done = {Path(r["path"]).name for r in records}
    for image in sorted(p for p in folder.glob("*.png") if p.name not in done)[3:]:
        image.unlink()
    rest = caption(models, folder, "--out", out, "--sidecar", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert f"3 captioned, {len(records)} already done" in rest.stderr


def test_console_script_is_declared() -> None:
    """`kvsmooth-caption` runs pykvsmooth.caption:main (pyproject [project.scripts])."""
    path = shutil.which("kvsmooth-caption")
    assert path, "kvsmooth-caption is not on PATH: run `make install`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--no-kvsmooth" in result.stdout
