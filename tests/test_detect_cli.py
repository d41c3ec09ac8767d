"""Detection where it plugs in, on real photos that ship in registry packages: ``python -m
facemargin.detect`` writes the landmark list ``embed landmarks=`` reads, ``embed`` and ``compare`` take
raw photos (detect, align, embed) and say which face they used; aligned crops and ``landmarks=``
keep working as before."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_detect import REFERENCE, assert_near, collage, run_python

from facemargin.detect.landmarks import read_landmarks
from facemargin.detect.mtcnn import MTCNN
from facemargin.detect.pipeline import detect_and_align
from facemargin.detect.samples import packaged_photo, packaged_photo_path


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """astronaut.png, people/grace_hopper.jpg (copied from the packages), coffee.png (no face) and
    collage.png (two faces: the astronaut largest, Grace Hopper central)."""
    root = tmp_path_factory.mktemp("raw") / "photos"
    (root / "people").mkdir(parents=True)
    (root / "astronaut.png").write_bytes(packaged_photo_path("astronaut").read_bytes())
    (root / "people" / "grace_hopper.jpg").write_bytes(packaged_photo_path("grace_hopper").read_bytes())
    (root / "coffee.png").write_bytes(packaged_photo_path("coffee").read_bytes())
    (root / "collage.png").write_bytes(_png(collage()[0]))
    return root


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory) -> Path:
    """A TorchScript model with facemargin's metadata whose embedding is the aligned crop's grey
    14x14 thumbnail, mean-centred: two crops of one face agree (cosine ~1), two faces do not (~0.55).
    What a test of detection + alignment needs, without trained weights."""
    import json

    class Thumbnail(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            grey = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 8).flatten(1)
            return grey - grey.mean(1, keepdim=True)

    path = tmp_path_factory.mktemp("model") / "thumbnail.pt"
    meta = {"input_size": 112, "channel_order": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3, "embedding_size": 196}
    torch.jit.save(torch.jit.trace(Thumbnail(), torch.zeros(2, 3, 112, 112)), str(path),
                   _extra_files={"facemargin.json": json.dumps(meta)})
    return path


def run(module: str, *args: str, cwd: Path, code: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})})
    assert proc.returncode == code, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_detect_cli_writes_the_landmark_list_and_the_photos_without_a_face(photos, tmp_path) -> None:
    out = tmp_path / "lists" / "landmarks.txt"
    proc = run("facemargin.detect", str(photos), f"out={out}", "progress=false", cwd=tmp_path)
    assert proc.stdout.splitlines() == [
        f"4 photos: 3 faces -> {out} (mtcnn, largest face where several)",
        f"no face: 1 photos -> {tmp_path / 'lists' / 'landmarks.noface.txt'}",
        "several faces: 1 photos (e.g. collage.png)",
    ]
    marks = read_landmarks(out, photos)
    assert list(marks) == [str(photos / n) for n in ("astronaut.png", "collage.png", "people/grace_hopper.jpg")]
    assert_near(marks[str(photos / "astronaut.png")], REFERENCE["astronaut"], "astronaut.png")
    assert_near(marks[str(photos / "people/grace_hopper.jpg")], REFERENCE["grace_hopper"], "grace_hopper.jpg")
    _, hopper_in_collage, astronaut_in_collage = collage()
    assert_near(marks[str(photos / "collage.png")], astronaut_in_collage, "collage, largest")
    assert (tmp_path / "lists" / "landmarks.noface.txt").read_text() == "coffee.png\n"
    assert all(len(line.split()) == 12 for line in out.read_text().splitlines())  # path, 10 numbers, score

    central = tmp_path / "central.txt"
    run("facemargin.detect", str(photos), f"out={central}", "choice=central", "detector.min_face_size=40",
        f"noface={tmp_path / 'none.txt'}", "progress=false", cwd=tmp_path)
    assert_near(read_landmarks(central, photos)[str(photos / "collage.png")], hopper_in_collage, "collage, central")
    assert (tmp_path / "none.txt").read_text() == "coffee.png\n"

    bad = run("facemargin.detect", str(photos), "choice=middle", cwd=tmp_path, code=2)
    assert bad.stderr == "facemargin.detect: error: face choice must be one of largest, central, got 'middle'\n"
    bad = run("facemargin.detect", str(tmp_path / "nowhere"), cwd=tmp_path, code=2)
    assert bad.stderr == f"facemargin.detect: error: image folder not found: {tmp_path / 'nowhere'}\n"
    bad = run("facemargin.detect", str(photos), "detector.min_size=3", cwd=tmp_path, code=2)
    assert bad.stderr.startswith("facemargin.detect: error: detector=mtcnn: unknown detector option(s) ['min_size']")


def test_help_answers_before_torch_is_imported() -> None:
    run_python("import sys, contextlib, io\n"
               "for name in ('facemargin.detect.__main__', 'facemargin.embed', 'facemargin.compare'):\n"
               "    module = __import__(name, fromlist=['main'])\n"
               "    out = io.StringIO()\n"
               "    with contextlib.redirect_stdout(out):\n"
               "        try:\n"
               "            module.main(['--help'])\n"
               "        except SystemExit as e:\n"
               "            assert e.code == 0, e.code\n"
               "    assert 'choice=largest' in out.getvalue() and 'detector.KEY=VALUE' in out.getvalue(), out.getvalue()\n"
               "assert 'torch' not in sys.modules, 'torch imported before the arguments were parsed'\n")


def test_embed_detects_raw_photos_and_keeps_aligned_crops(pixel_model, photos, tmp_path, capsys) -> None:
    from facemargin.embed import main as embed_main
    from facemargin.evaluation.embedder import load_embedder

    torch.set_num_threads(1)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png", "people/grace_hopper.jpg"):
        (folder / Path(name).name).write_bytes((photos / name).read_bytes())
    crop, found = detect_and_align(MTCNN(), packaged_photo("astronaut"))
    (folder / "aligned.png").write_bytes(_png(crop))  # a 112x112 crop: embedded as it is
    out = tmp_path / "emb.npy"
    embed_main([str(pixel_model), str(folder), f"out={out}", "progress=false"])
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"3 embeddings of size 196 -> {out} (image paths: {tmp_path / 'emb.txt'})",
        f"detected 2 of 3 photos (largest face where several: 0 photos); faces used -> {tmp_path / 'emb.landmarks.txt'}",
        f"no face found in 1 photos, not embedded -> {tmp_path / 'emb.noface.txt'}",
    ]
    assert (tmp_path / "emb.txt").read_text().split() == ["aligned.png", "astronaut.png", "grace_hopper.jpg"]
    assert (tmp_path / "emb.noface.txt").read_text() == "coffee.png\n"
    used = read_landmarks(tmp_path / "emb.landmarks.txt", folder)
    np.testing.assert_allclose(used[str(folder / "astronaut.png")], found.face.landmarks, atol=1e-3)
    emb = np.load(out)
    model = load_embedder(pixel_model)
    direct = model.embed(torch.from_numpy(crop).permute(2, 0, 1)[None])[0]
    np.testing.assert_allclose(emb[0], direct, atol=1e-5)  # the aligned crop, untouched
    np.testing.assert_allclose(emb[1], direct, atol=1e-5)  # the raw photo: detected and aligned the same way

    # the landmarks it wrote give the same embeddings through landmarks= (no detection)
    embed_main([str(pixel_model), str(folder), f"out={tmp_path / 'again.npy'}", f"landmarks={tmp_path / 'emb.landmarks.txt'}",
                "progress=false"])
    np.testing.assert_allclose(np.load(tmp_path / "again.npy"), emb[1:], atol=1e-4)  # the list keeps 1/1000 px
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_:
        embed_main([str(pixel_model), str(folder), f"out={tmp_path / 'x.npy'}", "detect=false", "progress=false"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"facemargin.embed: error: {folder / 'astronaut.png'} is 512x512 but the model takes 112x112 aligned faces")


def test_compare_raw_photos_says_which_face_it_used(pixel_model, photos, tmp_path, capsys) -> None:
    from facemargin.compare import compare, main as compare_main

    torch.set_num_threads(1)
    astronaut = packaged_photo("astronaut")
    # another crop of the same photo, enlarged 1.5x and saved as JPEG
    other = np.asarray(Image.fromarray(astronaut[20:420, 60:400]).resize((510, 600), Image.BICUBIC))
    (tmp_path / "other.jpg").write_bytes(_jpeg(other))
    model, a, b = str(pixel_model), str(photos / "astronaut.png"), str(tmp_path / "other.jpg")
    compare_main([model, a, b, "threshold=0.9"])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"{re.escape(a)}: 1 face: box 1\d\d,\d\d-2\d\d,1\d\d, score 0\.99\d\d", lines[0]), lines[0]
    assert lines[1].startswith(f"{b}: 1 face: box ")
    assert re.fullmatch(r"cosine similarity 0\.99\d\d; threshold 0\.9000 cosine \(given\): same person", lines[2]), lines[2]
    hopper = compare(model, a, str(photos / "people/grace_hopper.jpg"), threshold=0.9)
    assert not hopper["same"] and hopper["cosine"] < 0.8

    # two faces in one photo: the rule decides which one is compared
    coll = str(photos / "collage.png")
    largest = compare(model, a, coll, threshold=0.9, choice="largest")
    central = compare(model, a, coll, threshold=0.9, choice="central")
    assert largest["faces"][coll].startswith("largest of 2 faces: box ") and largest["same"]
    assert central["faces"][coll].startswith("central of 2 faces: box ") and not central["same"]
    assert abs(central["cosine"] - hopper["cosine"]) < 0.1  # the central face is Grace Hopper

    with pytest.raises(SystemExit) as exit_:
        compare_main([model, a, str(photos / "coffee.png"), "threshold=0.9"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"facemargin.compare: error: no face found in {photos / 'coffee.png'} (largest face of those scoring >= 0)"
    assert err[1].startswith("hint: give its 5 landmarks (landmarks=FILE)")


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(heading: str) -> tuple[list[list[str]], str | None]:
    """The README section under ``heading``: its first bash block as argument lists (comments
    dropped, each a ``python -m`` command) and its first python block (or None)."""
    section = README.read_text().split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    lines = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    commands = [line.split("#", 1)[0].split() for line in lines]
    assert all(argv[:2] == ["python", "-m"] for argv in commands), lines
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    return commands, snippet.group(1) if snippet else None


@pytest.mark.slow
def test_readme_detect_and_align_commands_run(pixel_model, photos, tmp_path, monkeypatch, capsys) -> None:
    """The README's "Detect and align faces" commands, as written (MODEL: the thumbnail model), and its snippet."""
    commands, snippet = readme_section("### Detect and align faces")
    work = tmp_path / "work"
    work.mkdir()
    (work / "photos").symlink_to(photos, target_is_directory=True)
    (work / "a.jpg").write_bytes((photos / "people" / "grace_hopper.jpg").read_bytes())
    (work / "b.jpg").write_bytes(_jpeg(np.ascontiguousarray(packaged_photo("grace_hopper")[::2, ::2])))
    (work / "photo.jpg").write_bytes(_jpeg(packaged_photo("astronaut")))
    outputs = []
    for argv in commands:
        outputs.append(run(argv[2], *[str(pixel_model) if a == "MODEL" else a for a in argv[3:]], cwd=work).stdout)
    assert (work / "landmarks.txt").is_file() and (work / "landmarks.noface.txt").read_text() == "coffee.png\n"
    assert (work / "embeddings.npy").is_file() and (work / "embeddings.noface.txt").read_text() == "coffee.png\n"
    assert outputs[3].splitlines()[0].startswith("a.jpg: 1 face: box ") and outputs[3].rstrip().endswith(": same person")
    monkeypatch.chdir(work)
    exec(compile(snippet, "README.md", "exec"), {})
    assert re.fullmatch(r"1 face: box 1\d\d,\d\d-2\d\d,1\d\d, score 0\.99\d\d\n", capsys.readouterr().out)


@pytest.mark.slow
def test_benchmark_scripts_run_on_the_packaged_photos(tmp_path) -> None:
    bench = README.parent / "benchmarks"
    proc = run_script(bench / "detect_throughput.py", "--no-variants", "--repeats", "1", cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["photos"] == 5 and result["with_face"] == 3 and result["face_found_share"] == 1.0
    assert result["false_detection_share"] == 0.0 and result["detect_per_cpu_s"] > 0
    assert result["pack_detect_per_cpu_s"] > 0 and result["pack_face_share"] == 1.0  # the packer's command
    out = tmp_path / "faces"
    proc = run_script(bench / "real_faces.py", "--out", str(out), "--count", "7", cwd=tmp_path)
    assert json.loads(proc.stdout)["people"] == 3
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    # round robin over astronaut, grace_hopper, camera
    assert files == ["astronaut/00000.jpg", "astronaut/00001.jpg", "astronaut/00002.jpg", "camera/00000.jpg",
                     "camera/00001.jpg", "grace_hopper/00000.jpg", "grace_hopper/00001.jpg"]
    assert all(Image.open(out / f).size == (112, 112) for f in files)
    assert (out / "SOURCES.txt").read_text().splitlines()[0].startswith("astronaut\tscikit-image ")


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FACEMARGIN_PHOTO_WHEELS", None)  # the installed packages' photos only
    proc = subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
