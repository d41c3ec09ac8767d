"""IJB-B/C protocol on a tiny set in the official layout, against a plain NumPy reference written here."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from facemargin.align import ARCFACE_TEMPLATE, align_face, warp_affine
from facemargin.data.formats.image import decode_image
from facemargin.data.tools.synthetic import render_identity
from facemargin.evaluation.embedder import Embedder
from facemargin.evaluation.ijb import IJBEvaluator, roc_curve
from facemargin.evaluation.runner import EmbeddingCache, embed_dataset, run_evaluator

N_IDS = 12  # G1 = subjects 0..5, G2 = subjects 6..11; every subject: 1 gallery + 2 probe templates


def _similarity(rng: np.random.Generator) -> np.ndarray:
    a, s = math.radians(rng.uniform(-30, 30)), rng.uniform(0.8, 1.5)
    c, d = s * math.cos(a), s * math.sin(a)
    return np.array([[c, -d, rng.uniform(20, 40)], [d, c, rng.uniform(20, 40)]])


def make_ijb(root: Path, target: str = "IJBC") -> dict:
    """Write a tiny IJB set; return what was written (the reference reads this, not the files)."""
    rng = np.random.default_rng(0)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    rec = {"name": [], "landmarks": [], "score": [], "tid": [], "mid": [], "subject_of": {}}
    roles = {}
    tid = 100
    for subject in range(N_IDS):
        faces = iter(render_identity(subject, 18, seed=3, split=1))
        shared_media = 9000 + subject  # one media id used by two templates of the subject
        for role in ("gallery", "probe", "probe"):
            tid += 7  # template ids are sparse
            rec["subject_of"][tid], roles[tid] = subject, role
            medias = [shared_media] + [int(m) for m in rng.choice(np.arange(10, 9000), size=rng.integers(0, 3), replace=False)]
            for mid in medias:
                for _ in range(int(rng.integers(1, 3))):
                    T = _similarity(rng)
                    size = (int(rng.integers(170, 200)), int(rng.integers(170, 200)))
                    photo = warp_affine(next(faces), T, size)
                    name = f"{len(rec['name']) + 1}.jpg"
                    (root / "loose_crop" / name).write_bytes(simplejpeg.encode_jpeg(photo, quality=95))
                    lm = ARCFACE_TEMPLATE @ T[:, :2].T + T[:, 2] + rng.normal(scale=0.5, size=(5, 2))
                    rec["name"].append(name)
                    rec["landmarks"].append([f"{v:.3f}" for v in lm.reshape(-1)])
                    rec["score"].append(f"{rng.uniform(0.3, 1.0):.3f}")
                    rec["tid"].append(tid)
                    rec["mid"].append(mid)
    t = target.lower()
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("".join(
        f"{n} {' '.join(lm)} {s}\n" for n, lm, s in zip(rec["name"], rec["landmarks"], rec["score"])))
    # what the files say, as float32 (the precision of insightface's reader)
    rec["landmarks"] = [np.array(lm, dtype=np.float32).reshape(5, 2) for lm in rec["landmarks"]]
    rec["score"] = [float(np.float32(s)) for s in rec["score"]]
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("".join(
        f"{n} {a} {b}\n" for n, a, b in zip(rec["name"], rec["tid"], rec["mid"])))
    templates = sorted(rec["subject_of"])
    rec["pairs"] = [(a, b, int(rec["subject_of"][a] == rec["subject_of"][b]))
                    for i, a in enumerate(templates) for b in templates[i + 1:]]
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in rec["pairs"]))
    galleries = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}[target]

    def csv(path: Path, chosen: list[int]) -> None:
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"]
        rows += [f"{tt},{rec['subject_of'][tt]},img/{n},1" for n, tt in zip(rec["name"], rec["tid"]) if tt in chosen]
        path.write_text("\n".join(rows) + "\n")

    rec["gallery"] = []
    for g, subjects in zip(galleries, (range(0, 6), range(6, 12))):
        chosen = [tt for tt in templates if roles[tt] == "gallery" and rec["subject_of"][tt] in subjects]
        csv(root / "meta" / f"{t}_1N_gallery_{g}.csv", chosen)
        rec["gallery"].append(chosen)
    rec["probes"] = [tt for tt in templates if roles[tt] == "probe"]
    csv(root / "meta" / f"{t}_1N_probe_mixed.csv", rec["probes"])
    return rec


# ------------------------------------------------------------------ the reference (plain loops)


def ref_templates(emb: np.ndarray, rec: dict) -> dict[int, np.ndarray]:
    feats = emb.astype(np.float64) * np.array(rec["score"])[:, None]  # N1 (norm kept), D1 (faceness)
    out = {}
    for t in sorted(set(rec["tid"])):
        rows = [i for i, tt in enumerate(rec["tid"]) if tt == t]
        media = {}
        for i in rows:
            media.setdefault(rec["mid"][i], []).append(feats[i])
        total = sum(np.mean(v, axis=0) for v in media.values())
        out[t] = total / np.sqrt(np.sum(total**2))
    return out


def ref_roc(labels: list[int], scores: list[float]) -> tuple[list[float], list[float]]:
    """sklearn roc_curve semantics, brute force: one point per distinct score, collinear points dropped."""
    pos, neg = sum(labels), len(labels) - sum(labels)
    pts = []
    for thr in sorted(set(scores), reverse=True):
        tp = sum(1 for l, s in zip(labels, scores) if s >= thr and l)
        fp = sum(1 for l, s in zip(labels, scores) if s >= thr and not l)
        pts.append((fp, tp))
    kept = [pts[0]] + [pts[i] for i in range(1, len(pts) - 1)
                       if pts[i + 1][0] - 2 * pts[i][0] + pts[i - 1][0] != 0
                       or pts[i + 1][1] - 2 * pts[i][1] + pts[i - 1][1] != 0] + [pts[-1]]
    kept = [(0, 0)] + kept
    return [fp / neg for fp, _ in kept], [tp / pos for _, tp in kept]


def ref_tar_at_far(labels: list[int], scores: list[float], far: float) -> float:
    fpr, tpr = ref_roc(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    _, i = min(zip([abs(f - far) for f in fpr], range(len(fpr))))  # insightface's selection
    return tpr[i]


def ref_identification(feats: dict[int, np.ndarray], rec: dict, fpir: float) -> tuple[float, float, float]:
    probes = sorted(set(rec["probes"]))
    rank1 = rank5 = 0
    tpirs = []
    for gallery in rec["gallery"]:
        g = sorted(set(gallery))
        g_ids = [rec["subject_of"][t] for t in g]
        mated_ok, mated_n, non_mated_top = [], 0, []
        for p in probes:
            sims = [float(feats[p] @ feats[t]) for t in g]
            if rec["subject_of"][p] in g_ids:
                j = g_ids.index(rec["subject_of"][p])
                higher = sum(1 for s in sims if s > sims[j])
                rank1 += higher < 1
                rank5 += higher < 5
                others = [s for s, i in zip(sims, g_ids) if i != rec["subject_of"][p]]
                mated_ok.append((sims[j], sims[j] > max(others)))
                mated_n += 1
            else:
                non_mated_top.append(max(sims))
        thr = sorted(non_mated_top, reverse=True)[max(int(len(non_mated_top) * fpir) - 1, 0)]
        tpirs.append(sum(1 for s, first in mated_ok if first and s > thr) / mated_n)
    return rank1 / len(probes), rank5 / len(probes), float(np.mean(tpirs))


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def ijb(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    return root, make_ijb(root)


@pytest.fixture(scope="module")
def model() -> Embedder:
    """A small untrained CNN: the protocol only needs embeddings that depend on the face."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(3), torch.nn.Flatten(), torch.nn.Linear(288, 32),
    )
    return Embedder.from_module(net)


@pytest.fixture(scope="module")
def embedded(ijb, model) -> tuple[np.ndarray, np.ndarray]:
    return embed_dataset(model, IJBEvaluator(ijb[0]).dataset(), batch_size=32, num_workers=0, progress=False)


def test_dataset_aligns_each_loose_crop_with_its_landmarks(ijb) -> None:
    root, rec = ijb
    ev = IJBEvaluator(root)
    assert ev.num_images == len(rec["name"]) and ev.name == "ijbc" and ev.identification
    ds = ev.dataset()
    for i in (0, 7, len(rec["name"]) - 1):
        img, idx = ds[i]
        photo = decode_image((root / "loose_crop" / rec["name"][i]).read_bytes())
        want = align_face(photo, rec["landmarks"][i])
        assert int(idx) == i and img.dtype == torch.uint8
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), want)


def test_runner_embeds_image_plus_flip(ijb, model, embedded) -> None:
    root, rec = ijb
    ds = IJBEvaluator(root).dataset()
    emb, norms = embedded
    net = model.net
    for i in (0, 5, 30):
        x = (ds[i][0].float()[None] / 255 - 0.5) / 0.5
        with torch.no_grad():
            a, b = net(x)[0].numpy(), net(torch.flip(x, dims=[3]))[0].numpy()
        np.testing.assert_allclose(emb[i], a + b, rtol=1e-4, atol=1e-4)
        assert norms[i] == pytest.approx((np.linalg.norm(a) + np.linalg.norm(b)) / 2, rel=1e-4)


def test_pooled_templates_and_scores_equal_the_reference(ijb, model, embedded, tmp_path) -> None:
    root, rec = ijb
    ev = IJBEvaluator(root)
    emb, norms = embedded

    ids, feats = ev.template_features(emb)
    want = ref_templates(emb, rec)
    assert ids.tolist() == sorted(want)
    np.testing.assert_allclose(feats, np.stack([want[t] for t in ids]), rtol=0, atol=1e-12)

    got = ev.score(emb, norms)  # float64 figures (compute() returns them as float32 tensors)
    labels = [c for _, _, c in rec["pairs"]]
    scores = [float(want[a] @ want[b]) for a, b, _ in rec["pairs"]]
    n_neg = labels.count(0)
    assert n_neg == 594  # 630 template pairs, 36 genuine
    for far in (1e-2, 1e-1):
        assert got[f"tar@far=1e-{round(-math.log10(far))}"] == ref_tar_at_far(labels, scores, far)
    assert 0 < got["tar@far=1e-2"] <= got["tar@far=1e-1"] <= 1
    for k in ("tar@far=1e-6", "tar@far=1e-5", "tar@far=1e-4", "tar@far=1e-3"):
        assert math.isnan(got[k])
    assert ev.notes["tar@far=1e-3"] == "FAR 0.001 needs at least 1000 impostor pairs, this set has 594"
    fpr, tpr = ref_roc(labels, scores)
    assert got["auc"] == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)

    rank1, rank5, tpir = ref_identification(want, rec, 0.1)
    assert got["rank1"] == rank1 and got["rank5"] == rank5 and got["tpir@fpir=1e-1"] == tpir
    assert math.isnan(got["tpir@fpir=1e-2"])
    assert ev.notes["tpir@fpir=1e-2"] == "FPIR 0.01 needs at least 100 non-mated probes per gallery, gallery G1 has 12"
    assert rank5 >= rank1 > 0

    # through the runner with a cache: the second run reads the embeddings back, same figures
    cache = EmbeddingCache(tmp_path / "cache")
    keyed = Embedder(model.net, model.metadata, key="demo-weights")
    first, hit1 = run_evaluator(keyed, IJBEvaluator(root), cache, batch_size=32, num_workers=0, progress=False)
    again, hit2 = run_evaluator(keyed, IJBEvaluator(root), cache, batch_size=32, num_workers=0, progress=False)
    assert (hit1, hit2) == (False, True)
    assert again == pytest.approx(first, nan_ok=True) and first == pytest.approx(got, rel=1e-4, abs=1e-4, nan_ok=True)


def test_faceness_and_norm_options_change_the_pooling(ijb) -> None:
    root, rec = ijb
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(rec["name"]), 8))
    plain = IJBEvaluator(root, faceness=False, normalize_images=True).template_features(emb)[1]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    want = ref_templates(unit, {**rec, "score": [1.0] * len(rec["name"])})
    np.testing.assert_allclose(plain, np.stack([want[t] for t in sorted(want)]), atol=1e-12)


def test_roc_curve_matches_sklearns_documented_example() -> None:
    # sklearn.metrics.roc_curve docstring: y=[1,1,2,2], scores=[.1,.4,.35,.8], pos_label=2
    fpr, tpr, thr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # ties share one point; collinear interior points are dropped
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.2, 0.1])
    fpr, tpr, _ = roc_curve(labels, scores)
    ref_fpr, ref_tpr = ref_roc(labels.tolist(), scores.tolist())
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert len(fpr) == 4  # (0,0), (1/5, 1/3) and (2/5, 2/3) are collinear with (3/5, 1): dropped


def test_meta_errors_name_the_file(ijb, tmp_path) -> None:
    import shutil

    src, _ = ijb
    root = tmp_path / "IJBC"
    shutil.copytree(src / "meta", root / "meta")
    tid = root / "meta" / "ijbc_face_tid_mid.txt"
    lines = tid.read_text().splitlines()
    tid.write_text("\n".join(["2.jpg 1 1"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid\.txt:1: expected '1\.jpg <template id> <media id>'"):
        IJBEvaluator(root)
    tid.write_text("\n".join(lines) + "\n")
    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "107 99999 0\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label\.txt: template ids \[99999\] are not in"):
        IJBEvaluator(root)
    (root / "meta" / "ijbc_name_5pts_score.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"IJB meta file not found: .*ijbc_name_5pts_score\.txt"):
        IJBEvaluator(root)
    with pytest.raises(ValueError, match="IJBB or IJBC"):
        IJBEvaluator(root, target="IJBA")


def test_ijb_evaluator_runs_in_lightning_validation(ijb, model, embedded) -> None:
    """The same evaluator object inside FaceRecognitionModule's validation: logged, not averaged into val/acc."""
    import lightning.pytorch as pl

    from facemargin.heads import MarginHead
    from facemargin.module import FaceRecognitionModule

    root, _ = ijb
    module = FaceRecognitionModule(model.net, MarginHead(32, 4), evaluators=[IJBEvaluator(root)],
                                   val_batch_size=64, val_num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    logged = trainer.validate(module, verbose=False)[0]
    want = IJBEvaluator(root).score(*embedded)
    assert "val/acc" not in logged and not module.verification  # IJB has no accuracy and no threshold
    for key in ("tar@far=1e-1", "tar@far=1e-2", "auc", "rank1", "rank5", "tpir@fpir=1e-1"):
        assert logged[f"val/ijbc/{key}"] == pytest.approx(want[key], abs=1e-4), key
    assert math.isnan(logged["val/ijbc/tar@far=1e-4"])


# ------------------------------------------------------------------ input checked at read (issue 18)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("field, value, why", [
    (11, "nan", r"landmarks and score must be finite numbers"),   # faceness NaN (today: TAR moves, exit 0)
    (3, "inf", r"landmarks and score must be finite numbers"),    # a landmark coordinate
    (11, "-0.5", r"faceness score -0\.5 is negative"),
])
def test_non_finite_or_negative_values_name_the_file_and_line(ijb, tmp_path, field, value, why) -> None:
    from facemargin.errors import UserError

    root = _copy(ijb[0], tmp_path / "IJBC")
    lmk = root / "meta" / "ijbc_name_5pts_score.txt"
    _edit_line(lmk, 7, lambda line: " ".join(value if i == field else f for i, f in enumerate(line.split())))
    with pytest.raises(UserError, match=rf"ijbc_name_5pts_score\.txt:7: {why}"):
        IJBEvaluator(root)


@pytest.mark.parametrize("name, why", [("../meta/ijbc_face_tid_mid.txt", "a '..' component"),
                                       ("/etc/hostname", "an absolute path")])
def test_image_names_that_leave_loose_crop_are_refused(ijb, tmp_path, name, why) -> None:
    from facemargin.errors import UserError

    root = _copy(ijb[0], tmp_path / "IJBC")
    for meta in ("ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt"):
        _edit_line(root / "meta" / meta, 3, lambda line: " ".join([name, *line.split()[1:]]))
    with pytest.raises(UserError, match=rf"ijbc_name_5pts_score\.txt:3: image name '{re.escape(name)}' is {why}"):
        IJBEvaluator(root)


def test_a_symbolic_link_out_of_loose_crop_is_refused_before_any_image_is_read(ijb, tmp_path) -> None:
    from facemargin.errors import UserError

    root = _copy(ijb[0], tmp_path / "IJBC")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((root / "loose_crop" / "1.jpg").read_bytes())
    (root / "loose_crop" / "5.jpg").unlink()
    (root / "loose_crop" / "5.jpg").symlink_to(outside)
    ev = IJBEvaluator(root)  # the meta files are fine; the images are checked before they are used
    for use in (ev.dataset, ev.cache_key):
        with pytest.raises(UserError, match=rf"ijbc_name_5pts_score\.txt:5: image '5\.jpg' is a symbolic link to "
                                            rf"{re.escape(str(outside.resolve()))}, outside "):
            use()
    # a link that stays inside is an image like any other; so is a linked loose_crop/ folder itself
    (root / "loose_crop" / "5.jpg").unlink()
    (root / "loose_crop" / "5.jpg").symlink_to(root / "loose_crop" / "1.jpg")
    assert IJBEvaluator(root).cache_key()
    linked = tmp_path / "linked" / "IJBC"
    linked.mkdir(parents=True)
    (linked / "meta").symlink_to(root / "meta")
    (linked / "loose_crop").symlink_to(root / "loose_crop")
    assert len(IJBEvaluator(linked).dataset()) == len(ijb[1]["name"])
    # a missing image is named with its line before anything is embedded
    (root / "loose_crop" / "9.jpg").unlink()
    with pytest.raises(UserError, match=r"ijbc_name_5pts_score\.txt:9: image not found: .*loose_crop/9\.jpg"):
        IJBEvaluator(root).dataset()


def test_a_csv_without_its_header_is_refused(ijb, tmp_path) -> None:
    from facemargin.errors import UserError

    root = _copy(ijb[0], tmp_path / "IJBC")
    probe = root / "meta" / "ijbc_1N_probe_mixed.csv"
    probe.write_text("".join(probe.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(UserError, match=r"ijbc_1N_probe_mixed\.csv:1: expected the header line 'TEMPLATE_ID,SUBJECT_ID,\.\.\.', "
                                        r"got '\d+,\d+,img/"):
        IJBEvaluator(root)


def test_roc_curve_refuses_nan_like_sklearn() -> None:
    # sklearn.metrics.roc_curve runs assert_all_finite on y_true and y_score: "Input contains NaN"
    for scores in ([0.1, np.nan, 0.3, 0.8], [0.1, np.inf, 0.3, 0.8]):
        with pytest.raises(ValueError, match=r"roc_curve: scores contain NaN or infinity \(1 of 4\)"):
            roc_curve(np.array([0, 0, 1, 1]), np.array(scores))
    with pytest.raises(ValueError, match=r"labels contain NaN"):
        roc_curve(np.array([0, np.nan, 1, 1]), np.array([0.1, 0.2, 0.3, 0.8]))


def test_non_finite_embeddings_give_null_figures_with_the_reason(ijb, embedded) -> None:
    emb, norms = embedded
    bad = emb.copy()
    bad[4] = np.nan
    ev = IJBEvaluator(ijb[0])
    got = ev.score(bad, norms)
    assert all(math.isnan(v) for v in got.values()) and "auc" in got and "rank1" in got
    assert ev.notes["auc"] == f"1 of {len(emb)} images have non-finite embeddings (NaN or inf)"


def test_replacing_two_images_changes_the_cached_result(ijb, model, tmp_path) -> None:
    """The embedding cache key covers the images, not only the meta files."""
    root = _copy(ijb[0], tmp_path / "IJBC")
    cache = EmbeddingCache(tmp_path / "cache")
    keyed = Embedder(model.net, model.metadata, key="demo-weights")

    def scored(**kw) -> tuple[dict, bool]:
        return run_evaluator(keyed, IJBEvaluator(root), kw.get("cache", cache), batch_size=64, num_workers=0, progress=False)

    before, hit = scored()
    assert not hit and scored()[1]  # the second run reads the cache
    crops = root / "loose_crop"
    a, b = (crops / "2.jpg").read_bytes(), (crops / "60.jpg").read_bytes()  # two subjects' faces, swapped
    stat_a, stat_b = (crops / "2.jpg").stat(), (crops / "60.jpg").stat()
    (crops / "2.jpg").write_bytes(b)
    (crops / "60.jpg").write_bytes(a)
    os.utime(crops / "2.jpg", ns=(stat_a.st_atime_ns, stat_a.st_mtime_ns))  # even with the old times put back
    os.utime(crops / "60.jpg", ns=(stat_b.st_atime_ns, stat_b.st_mtime_ns))
    after, hit = scored()
    fresh, _ = scored(cache=None)
    assert not hit
    assert after == pytest.approx(fresh, nan_ok=True)
    assert after["auc"] != before["auc"]
