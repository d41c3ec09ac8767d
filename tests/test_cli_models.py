"""The entry points on a trained checkpoint: export, evaluate (Hydra), embed, compare, and the README snippet."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from hydra import compose, initialize_config_dir

from facemargin.align import ARCFACE_TEMPLATE, warp_affine
from facemargin.data.formats.image import decode_image
from facemargin.data.tools.synthetic import render_identity
from facemargin.evaluate import _instantiate_evaluators, _plain, evaluate
from facemargin.evaluation import BinPairsEvaluator, FolderPairsEvaluator
from facemargin.evaluation.embedder import load_embedder
from facemargin.errors import UserError
from facemargin.evaluation.runner import EmbeddingCache, run_evaluator
from facemargin.train import config_dir

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})}, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Aligned 112x112 demo faces in an LFW layout (``Person_k/Person_k_000i.jpg``) with a pairs.txt."""
    root = tmp_path_factory.mktemp("lfw_aligned")
    for k in range(4):
        person = f"Person_{k}"
        (root / "images" / person).mkdir(parents=True)
        for i, img in enumerate(render_identity(k, 3, seed=7, split=1), start=1):
            (root / "images" / person / f"{person}_{i:04d}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=95))
    lines = ["2\t4"]  # LFW header: folds, pairs per fold; same and different pairs alternate
    for k in range(4):
        lines += [f"Person_{k}\t1\t{2 + k % 2}", f"Person_{k}\t1\tPerson_{(k + 1) % 4}\t3"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_export_then_evaluate_the_onnx_file_twice(demo_checkpoint, faces, tmp_path) -> None:
    onnx_path = tmp_path / "model.onnx"
    proc = run("facemargin.export", f"ckpt_path={demo_checkpoint}", f"out={onnx_path}", cwd=tmp_path)
    assert f"exported onnx model (batch axis dynamic): {onnx_path}" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no run folder, no log file

    demo_bin = demo_checkpoint.parent / "demo_val.bin"
    args = [f"ckpt_path={onnx_path}", "eval=[bin,folder]", f"eval.bin.path={demo_bin}", "eval.bin.far_targets=[1e-1,1e-3]",
            f"eval.folder.pairs={faces / 'pairs.txt'}", f"eval.folder.root={faces / 'images'}", "eval.folder.nfolds=2",
            f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "progress=false"]
    first = run("facemargin.evaluate", *args, f"hydra.run.dir={tmp_path / 'run1'}", cwd=tmp_path)
    one = json.loads((tmp_path / "run1" / "eval.json").read_text())
    assert one["cached"] == {"demo_val": False, "folder": False} and one["model"] == str(onnx_path)

    # scoring again with the same config reads the embeddings back from the cache
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=args)
    again = evaluate(load_embedder(cfg.ckpt_path), list(_instantiate_evaluators(cfg.eval).values()),
                     EmbeddingCache(cfg.cache_dir), num_workers=0, progress=False)
    assert again["cached"] == {"demo_val": True, "folder": True}
    assert json.loads(json.dumps(_plain(again["sets"]))) == one["sets"]

    # the same figures as the checkpoint itself, scored in this process
    want, _ = run_evaluator(load_embedder(demo_checkpoint), BinPairsEvaluator(demo_bin, far_targets=[0.1, 0.001]),
                            num_workers=0, progress=False)
    got = one["sets"]["demo_val"]  # a set is named by its evaluator (the .bin file's stem)
    assert got["acc"] == pytest.approx(want["acc"]) and got["tar@far=1e-1"] == pytest.approx(want["tar@far=1e-1"])
    assert got["tar@far=1e-3"] is None and set(got) == {"acc", "acc_std", "threshold_cosine", "xnorm", "tar@far=1e-1", "tar@far=1e-3"}
    assert one["notes"]["demo_val"] == {"tar@far=1e-3": "FAR 0.001 needs at least 1000 negative pairs in each of the "
                                        "10 training splits, this set has 45; choose larger far_targets or a larger set"}
    folder, _ = run_evaluator(load_embedder(demo_checkpoint), FolderPairsEvaluator(faces / "pairs.txt", faces / "images", nfolds=2),
                              num_workers=0, progress=False)
    assert one["sets"]["folder"]["acc"] == pytest.approx(folder["acc"])
    # the table: one row per set, nulls marked and explained
    table = first.stdout
    assert re.search(r"^demo_val\s+" + re.escape(f"{want['acc']:.4f}"), table, re.M), table
    assert "null*" in table and "* demo_val tar@far=1e-3: FAR 0.001 needs at least 1000 negative pairs" in table
    assert f"wrote {tmp_path / 'run1' / 'eval.json'}" in first.stdout


def test_missing_set_names_the_key_and_the_roots(demo_checkpoint, tmp_path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={demo_checkpoint}", "eval=[lfw,ijbc]", f"eval_root={tmp_path}"])
    assert cfg.eval.lfw.path == f"{tmp_path}/lfw.bin" and cfg.eval.ijbc.root.endswith("IJB_release/IJBC")
    with pytest.raises(UserError, match=r"eval\.lfw: verification file not found: .*lfw\.bin$") as missing:
        _instantiate_evaluators(cfg.eval)
    assert missing.value.hint.startswith("say where the sets live: eval_root=")


def test_embed_and_compare_entry_points(demo_checkpoint, faces, tmp_path, capsys) -> None:
    from facemargin.compare import main as compare_main
    from facemargin.embed import main as embed_main

    images = faces / "images"
    out = tmp_path / "emb.npy"
    embed_main([str(demo_checkpoint), str(images), f"out={out}", "progress=false"])
    emb = np.load(out)
    names = (tmp_path / "emb.txt").read_text().split()
    assert emb.shape == (12, 64) and emb.dtype == np.float32 and len(names) == 12
    assert names[0] == "Person_0/Person_0_0001.jpg"
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    model = load_embedder(demo_checkpoint)
    first = torch.from_numpy(decode_image((images / names[0]).read_bytes())).permute(2, 0, 1)[None]
    np.testing.assert_allclose(emb[0], model.embed(first)[0], atol=1e-5)

    # loose photos + 5-point landmarks: aligned first, then embedded like the aligned crops
    photos = tmp_path / "photos"
    photos.mkdir()
    lm_lines = []
    for i, name in enumerate(names[:3]):
        T = np.array([[1.3, -0.2, 40.0 + i], [0.2, 1.3, 30.0]])
        face = decode_image((images / name).read_bytes())
        (photos / f"p{i}.png").write_bytes(_png(warp_affine(face, T, (220, 220))))
        lm = ARCFACE_TEMPLATE @ T[:, :2].T + T[:, 2]
        lm_lines.append(f"p{i}.png " + " ".join(f"{v:.4f}" for v in lm.reshape(-1)) + " 0.99")
    (photos / "lm.txt").write_text("\n".join(lm_lines) + "\n")
    embed_main([str(demo_checkpoint), str(photos), f"out={tmp_path / 'aligned.npy'}", f"landmarks={photos / 'lm.txt'}",
                "progress=false"])
    aligned = np.load(tmp_path / "aligned.npy")
    assert aligned.shape == (3, 64)
    assert np.all(np.sum(aligned * emb[:3], axis=1) > 0.95)  # the same faces, up to two resamplings

    record = torch.load(demo_checkpoint, map_location="cpu", weights_only=True)["facemargin"]
    t = record["verification"]["demo_val"]["threshold_cosine"]  # a cosine similarity, stored as such
    a, b = images / names[0], images / names[1]
    assert "12 embeddings of size 64 -> " in capsys.readouterr().out
    compare_main([str(demo_checkpoint), str(a), str(b)])
    printed = capsys.readouterr().out
    cosine = float(emb[0] @ emb[1])
    verdict = "same person" if cosine > t else "different people"
    assert printed.strip() == (f"cosine similarity {cosine:.4f}; threshold {t:.4f} cosine (chosen by validation on "
                               f"demo_val (accuracy {record['verification']['demo_val']['acc']:.4f})): {verdict}")
    compare_main([str(demo_checkpoint), str(a), str(b), "threshold=-1"])
    assert capsys.readouterr().out.strip().endswith("(given): same person")
    with pytest.raises(SystemExit) as exit_:
        compare_main([str(demo_checkpoint), str(a), str(b), "thresh=0.3"])
    assert exit_.value.code == 2
    assert "facemargin.compare: error: unknown option 'thresh' (did you mean threshold=?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # detect=false: photos must be aligned crops
        embed_main([str(demo_checkpoint), str(photos), f"out={tmp_path / 'x.npy'}", "detect=false", "progress=false"])
    assert exit_.value.code == 2
    assert re.search(r"photos/p0\.png is 220x220 but the model takes 112x112 aligned faces: let a detector find",
                     capsys.readouterr().err)


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_readme_use_your_model_snippet_runs(demo_checkpoint, faces, tmp_path, monkeypatch, capsys) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use your model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copy(demo_checkpoint, tmp_path / "model.ckpt")
    shutil.copy(faces / "images" / "Person_0" / "Person_0_0001.jpg", tmp_path / "a.jpg")
    shutil.copy(faces / "images" / "Person_0" / "Person_0_0002.jpg", tmp_path / "b.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert re.fullmatch(r"cosine -?\d\.\d{3}: (same person|different people)\n", capsys.readouterr().out)


def test_tables_group_sets_by_protocol_and_explain_nulls() -> None:
    from facemargin.evaluate import format_tables

    nan = float("nan")
    result = {
        "sets": {
            "lfw": {"acc": 0.99833, "xnorm": 21.456, "tar@far=1e-4": nan},
            "agedb_30": {"acc": 0.98, "xnorm": 20.0, "tar@far=1e-4": nan},
            "ijbc": {"tar@far=1e-4": 0.9621, "rank1": 0.97},
        },
        "notes": {"lfw": {"tar@far=1e-4": "needs 10000"}, "agedb_30": {"tar@far=1e-4": "needs more"}, "ijbc": {}},
    }
    assert format_tables(result) == (
        "set          acc  xnorm  tar@far=1e-4\n"
        "--------  ------  -----  ------------\n"
        "lfw       0.9983  21.46         null*\n"
        "agedb_30  0.9800  20.00         null*\n"
        "\n"
        "set   tar@far=1e-4   rank1\n"
        "----  ------------  ------\n"
        "ijbc        0.9621  0.9700\n"
        "\n"
        "* lfw tar@far=1e-4: needs 10000\n"
        "* agedb_30 tar@far=1e-4: needs more"
    )
