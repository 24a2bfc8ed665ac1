"""Captioning on Ray Data (pykvsmooth.ray), in local mode on this machine with two actors on
the tiny LLaVA fixture: the same captions as the single-process tool, a corrupt image as an
error row (the job goes on), a rerun that skips the finished rows, images as bytes or paths,
KVSmooth per run. Kept to a few runs: starting Ray and two actors costs ~10 s on 2 cores."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import TinyLlava  # first: it puts scripts/ on sys.path (also when run as a script)

import make_tiny_llava  # noqa: E402

import ray  # the ray extra: pip install "pykvsmooth[ray]" (make test installs it)
import ray.data

TIMEOUT_S = 480
MAX_TOKENS = 8
GOOD = ("a.png", "sub/b.jpg", "c.webp")
CORRUPT = "sub/broken.png"
# small and bounded: two actors of half a CPU each fit the 2-core machines
RAY_OPTIONS = ("--ray-actors", "2", "--ray-cpus", "0.5", "--ray-batch-size", "1")


def write_photos(root: Path) -> Path:
    for seed, name in enumerate(GOOD):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_tiny_llava.write_test_image(root / name, size=(64, 48), seed=seed)
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return root


def caption(tiny: TinyLlava, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pykvsmooth.caption", *map(str, args), "--max-tokens", str(MAX_TOKENS),
           "--model", str(tiny.text), "--mmproj", str(tiny.mmproj)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def captions_by_name(records: List[dict], root: Path) -> Dict[str, dict]:
    return {Path(r["path"]).resolve().relative_to(root.resolve()).as_posix(): r for r in records}


def read_parquet_records(folder: Path) -> List[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    assert set(table.column_names) >= {"path", "caption", "error", "record"}
    return [json.loads(r) for r in table.column("record").to_pylist()]


def test_cli_on_ray_equals_single_process_and_resumes(tiny_llava: TinyLlava, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos")
    single = caption(tiny_llava, photos, "--out", tmp_path / "single.jsonl", "--sidecar", cwd=tmp_path)
    assert single.returncode == 1, single.stderr  # the corrupt file
    expected = captions_by_name([json.loads(line) for line in
                                 (tmp_path / "single.jsonl").read_text(encoding="utf-8").splitlines()], photos)

    out = tmp_path / "captions.parquet"
    first = caption(tiny_llava, photos, "--ray", *RAY_OPTIONS, "--out", out, "--sidecar", cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # an error row, not a failed job
    assert "3 captioned, 0 skipped, 1 failed" in first.stderr
    assert f"failed: {photos / CORRUPT}: cannot read image" in first.stderr
    got = captions_by_name(read_parquet_records(out), photos)
    assert sorted(got) == sorted([*GOOD, CORRUPT])
    assert "cannot read image" in got[CORRUPT]["error"] and "caption" not in got[CORRUPT]
    for name in GOOD:
        assert got[name]["caption"] == expected[name]["caption"], name
        assert got[name]["settings"] == expected[name]["settings"]
        assert got[name]["timings"]["completion_tokens"] == expected[name]["timings"]["completion_tokens"]
        assert (photos / name).with_suffix(".txt").read_text(encoding="utf-8") == got[name]["caption"] + "\n"

    # the corrupt file is repaired: a rerun sends only it to Ray
    make_tiny_llava.write_test_image(photos / CORRUPT, size=(64, 48), seed=9)
    again = caption(tiny_llava, "--ray", photos, *RAY_OPTIONS, "--out", out, cwd=tmp_path)  # `--ray FOLDER` too
    assert again.returncode == 0, again.stderr
    assert "1 captioned, 3 skipped, 0 failed" in again.stderr
    records = read_parquet_records(out)
    assert len(records) == 4 and all("caption" in r for r in records)
    assert len(list(out.glob("part-*.parquet"))) == 1


def api_scenario(text: str, mmproj: str, folder: str) -> None:
    """Run in a child process by the test below (so that Ray's start and shutdown are bounded
    by a timeout): prints the rows of three map_batches runs and this process's own captions."""
    from PIL import Image

    from pykvsmooth import caption as cap
    from pykvsmooth.config import KVSmoothConfig
    from pykvsmooth.ray import Captioner, caption_dataset

    photos = Path(folder)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        jpeg = io.BytesIO()
        Image.open(photos / GOOD[0]).save(jpeg, format="JPEG")
        images = [(photos / GOOD[0]).read_bytes(), jpeg.getvalue(), (photos / CORRUPT).read_bytes()]
        ds = ray.data.from_items([{"id": i, "image": b} for i, b in enumerate(images)])
        settings = dict(max_tokens=MAX_TOKENS, prompt="Describe the image.")
        smoothed = caption_dataset(ds, text, mmproj, kvsmooth=0.9, concurrency=2, num_cpus=0.5, batch_size=1,
                                   **settings).take_all()
        # KVSmooth off for this run; paths instead of bytes; map_batches itself, numpy batches
        paths = ray.data.from_items([{"path": str(photos / GOOD[0])}, {"path": str(photos / "missing.png")}])
        baseline = paths.map_batches(Captioner, fn_constructor_kwargs=dict(
            model=text, mmproj=mmproj, kvsmooth=None, **settings),
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=2).take_all()
    finally:
        ray.shutdown()
    here = cap.Captioner(cap.CaptionSettings(text, mmproj, **settings), None)
    try:
        png = cap.load_image(images[0])[0]
        mine = {"smoothed": here.caption(png, "Describe the image.", KVSmoothConfig(0.9))["caption"],
                "baseline": here.caption(png, "Describe the image.", None)["caption"]}
    finally:
        here.close()
    print(json.dumps({"smoothed": smoothed, "baseline": baseline, "here": mine}))


def test_map_batches_bytes_paths_and_kvsmooth_per_run(tiny_llava: TinyLlava, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    child = subprocess.run([sys.executable, __file__, str(tiny_llava.text), str(tiny_llava.mmproj), str(photos)],
                           capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-5000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])

    smoothed = sorted(got["smoothed"], key=lambda r: r["id"])
    assert [r["id"] for r in smoothed] == [0, 1, 2] and "image" not in smoothed[0]
    assert smoothed[0]["error"] is None and smoothed[0]["caption"]
    assert smoothed[1]["error"] is None and smoothed[1]["caption"]  # JPEG bytes
    assert smoothed[0]["prompt"] == "Describe the image." and smoothed[0]["completion_tokens"] > 0
    assert smoothed[2]["caption"] is None and "cannot read image" in smoothed[2]["error"]
    assert json.loads(smoothed[0]["kvsmooth"])["lambda_ref"] == pytest.approx(0.9)
    # the same captions as in one process, with the same settings
    assert smoothed[0]["caption"] == got["here"]["smoothed"]
    by_path = {Path(r["path"]).name: r for r in got["baseline"]}
    assert by_path[GOOD[0]]["caption"] == got["here"]["baseline"] and by_path[GOOD[0]]["kvsmooth"] == "null"
    assert by_path["missing.png"]["caption"] is None and "No such file" in by_path["missing.png"]["error"]


if __name__ == "__main__":
    api_scenario(*sys.argv[1:4])
