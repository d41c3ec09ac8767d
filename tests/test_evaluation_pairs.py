"""Verification protocol: NumPy reference, hand-computed case, XNorm, dedup and 2-rank gloo sync."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facemargin.evaluation.pairs import PairsEvaluator, far_key, verification_scores


def VerificationAccuracy(issame):
    """The pairs evaluator alone, as a metric over embeddings (its images are never decoded here)."""
    return PairsEvaluator([b""] * (2 * len(issame)), issame)


# --------------------------------------------------------------------------------------------
# Independent, deliberately plain reference of insightface's verification.evaluate
# (loops over thresholds, boolean masks, sklearn-style ordered KFold, scipy-style slinear interp).
# --------------------------------------------------------------------------------------------


def ref_folds(n: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out, start = [], 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        test = np.arange(start, start + size)
        train = np.array([j for j in range(n) if not start <= j < start + size])
        out.append((train, test))
        start += size
    return out


def ref_accuracy(threshold: float, d: np.ndarray, same: np.ndarray) -> float:
    pred = d < threshold
    tp = np.sum(pred & same)
    tn = np.sum(~pred & ~same)
    return (tp + tn) / d.size


def ref_val_far(threshold: float, d: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    pred = d < threshold
    return np.sum(pred & same) / np.sum(same), np.sum(pred & ~same) / np.sum(~same)


def ref_interp(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    """Piecewise-linear through sorted points; at a repeated x the last point's y (scipy slinear)."""
    for j in range(len(xs) - 1):
        if xs[j] <= x < xs[j + 1]:
            return ys[j] + (x - xs[j]) * (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
    raise AssertionError("target FAR outside the curve")


def ref_evaluate(emb: np.ndarray, same: np.ndarray, nfolds: int = 10) -> dict[str, float]:
    xnorm = np.mean([np.linalg.norm(e) for e in emb])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    thresholds = np.arange(0, 4, 0.01)
    accs, best_ts = [], []
    for train, test in ref_folds(len(same), nfolds):
        acc_train = np.array([ref_accuracy(t, d[train], same[train]) for t in thresholds])
        best = int(np.argmax(acc_train))
        best_ts.append(thresholds[best])
        accs.append(ref_accuracy(thresholds[best], d[test], same[test]))
    # insightface reports the mean squared distance t; for unit vectors |a - b|^2 = 2 - 2 cos(a, b)
    res = {"acc": np.mean(accs), "acc_std": np.std(accs), "threshold_cosine": 1 - np.mean(best_ts) / 2, "xnorm": xnorm}
    val_thresholds = np.arange(0, 4, 0.001)
    for key, far_target in (("tar@far=1e-3", 1e-3), ("tar@far=1e-4", 1e-4)):
        vals = []
        for train, test in ref_folds(len(same), nfolds):
            if np.sum(~same[train]) < 1 / far_target:
                vals = [math.nan]
                break
            neg = d[train][~same[train]]
            far_train = np.concatenate(  # fraction of negatives accepted at each threshold
                [np.mean(neg[None, :] < ts[:, None], axis=1) for ts in np.array_split(val_thresholds, 40)]
            )
            t = ref_interp(far_train, val_thresholds, far_target) if far_train.max() >= far_target else 0.0
            vals.append(ref_val_far(t, d[test], same[test])[0])
        res[key] = np.mean(vals)
    return {k: float(v) for k, v in res.items()}


def planted(n_pairs: int, dim: int, seed: int, p_same: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose second image is the first plus noise; genuine pairs get less noise."""
    rng = np.random.default_rng(seed)
    same = rng.random(n_pairs) < p_same
    a = rng.normal(size=(n_pairs, dim))
    noise = rng.normal(size=(n_pairs, dim)) * np.where(same, 0.9, 2.5)[:, None]
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, a + noise
    return emb * rng.uniform(5, 15, size=(2 * n_pairs, 1)), same


def assert_scores_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == {"acc", "acc_std", "threshold_cosine", "xnorm", "tar@far=1e-3", "tar@far=1e-4"}
    for k, v in want.items():
        if math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_matches_reference_small_set_far_1e4_unresolvable() -> None:
    emb, same = planted(3000, 16, seed=1)
    got, want = verification_scores(emb, same), ref_evaluate(emb, same)
    assert_scores_equal(got, want)
    assert 0.7 < got["acc"] < 1.0  # the planted signal is informative but not perfect
    assert math.isnan(got["tar@far=1e-4"]) and not math.isnan(got["tar@far=1e-3"])


def test_matches_reference_large_set_with_both_far_targets() -> None:
    emb, same = planted(12500, 8, seed=2, p_same=0.08)  # > 10000 negatives in every training split
    got, want = verification_scores(emb, same), ref_evaluate(emb, same)
    assert_scores_equal(got, want)
    assert 0.0 < got["tar@far=1e-4"] <= got["tar@far=1e-3"] < 1.0


def test_matches_reference_uneven_folds() -> None:
    emb, same = planted(1234, 4, seed=3, p_same=0.3)  # 1234 = 4 folds of 124 + 6 of 123
    assert_scores_equal(verification_scores(emb, same), ref_evaluate(emb, same))
    assert_scores_equal(verification_scores(emb, same, nfolds=5), ref_evaluate(emb, same, nfolds=5))


def _pair(d: float, norm_a: float, norm_b: float) -> np.ndarray:
    """Two 2-D vectors with the given norms whose unit vectors are ``d`` apart in squared L2."""
    theta = math.acos(1 - d / 2)
    return np.array([[norm_a, 0.0], [norm_b * math.cos(theta), norm_b * math.sin(theta)]])


def test_hand_computed_twenty_pairs() -> None:
    # Fold k holds pairs (2k, 2k+1): a genuine pair at distance 0.505 and an impostor at 1.505,
    # except pair 3 (impostor at 0.255) and pair 10 (genuine at 1.205).
    same = np.array([i % 2 == 0 for i in range(20)])
    d = np.where(same, 0.505, 1.505)
    d[3], d[10] = 0.255, 1.205
    emb = np.concatenate([_pair(di, 2.0, 4.0) for di in d])
    s = verification_scores(emb, same, nfolds=10)
    # Folds without pairs 3 / 10 in their test block: training accuracy peaks (17/18) for
    # 1.205 < t <= 1.505, first grid point 1.21; the test block is right (acc 1).
    # Fold 1 (tests pair 3): train peak 18/18 on (1.205, 1.505] -> 1.21; pair 3 accepted -> 0.5.
    # Fold 5 (tests pair 10): train peak 17/18 on (0.505, 1.505] -> 0.51; pair 10 rejected -> 0.5.
    assert s["acc"] == pytest.approx(0.9)
    assert s["acc_std"] == pytest.approx(0.2)  # sqrt((8 * 0.1^2 + 2 * 0.4^2) / 10)
    assert s["threshold_cosine"] == pytest.approx(1 - (9 * 1.21 + 0.51) / 10 / 2)  # cos = 1 - d / 2
    assert s["xnorm"] == pytest.approx(3.0)  # mean of norms 2 and 4
    assert math.isnan(s["tar@far=1e-3"]) and math.isnan(s["tar@far=1e-4"])  # 9 train negatives


def test_xnorm_is_mean_norm_before_normalisation() -> None:
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(40, 8))
    same = rng.random(20) < 0.5
    assert verification_scores(emb, same)["xnorm"] == pytest.approx(np.linalg.norm(emb, axis=1).mean())
    # scaling every embedding scales XNorm and changes nothing else
    a, b = verification_scores(emb, same), verification_scores(3 * emb, same)
    assert b["xnorm"] == pytest.approx(3 * a["xnorm"])
    assert {k: v for k, v in a.items() if k != "xnorm"} == pytest.approx(
        {k: v for k, v in b.items() if k != "xnorm"}, nan_ok=True
    )


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[2N, D\]"):
        verification_scores(np.zeros((10, 4)), np.zeros(4, dtype=bool))


def test_metric_sorts_and_drops_duplicates() -> None:
    emb, same = planted(300, 8, seed=5)
    want = verification_scores(emb, same)
    metric = VerificationAccuracy(same)
    order = np.random.default_rng(0).permutation(600)
    for chunk in np.array_split(order, 7):
        metric.update(torch.tensor(emb[chunk], dtype=torch.float64), torch.tensor(chunk))
    metric.update(torch.tensor(emb[:3], dtype=torch.float32), torch.arange(3))  # sampler padding
    got = metric.compute()
    assert set(got) == set(want)
    assert math.isnan(want["tar@far=1e-3"])  # 300 pairs: too few negatives, NaN passes through
    for k, v in want.items():
        assert isinstance(got[k], torch.Tensor) and got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(v, rel=1e-5, nan_ok=True), k


def test_metric_missing_images_error() -> None:
    emb, same = planted(30, 4, seed=6)
    metric = VerificationAccuracy(same)
    metric.update(torch.tensor(emb[:50]), torch.arange(50))
    with pytest.raises(RuntimeError, match=r"60 images but 50 distinct.*missing \[50, 51"):
        metric.compute()
    metric.reset()
    with pytest.raises(RuntimeError, match="before any update"), pytest.warns(UserWarning):
        metric.compute()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, n_pairs: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        emb, same = planted(n_pairs, 8, seed=7)
        n = 2 * n_pairs
        # DistributedSampler-like: interleaved shards, each rank padded with an image seen elsewhere
        idx = np.concatenate([np.arange(rank, n, world), [(rank + 1) % world]])
        metric = VerificationAccuracy(same)
        for chunk in np.array_split(idx, 3):
            metric.update(torch.tensor(emb[chunk], dtype=torch.float32), torch.tensor(chunk))
        res = {k: v.item() for k, v in metric.compute().items()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metric_syncs_across_two_gloo_ranks(tmp_path: Path) -> None:
    n_pairs = 200
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), n_pairs), nprocs=2, join=True)
    emb, same = planted(n_pairs, 8, seed=7)
    want = verification_scores(emb.astype(np.float32), same)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx(want, rel=1e-6, nan_ok=True), rank


def test_xnorm_is_insightfaces_mean_of_view_norms():
    """insightface's XNorm averages the norms of the image and flip embeddings, not of their sum."""
    import torch

    rng = np.random.default_rng(3)
    views = rng.normal(size=(2, 40, 8))  # [view, image, D]
    issame = np.array([True, False] * 10)
    metric = VerificationAccuracy(issame)
    summed = torch.tensor(views.sum(0), dtype=torch.float32)
    norms = torch.tensor(np.linalg.norm(views, axis=2).mean(0), dtype=torch.float32)
    metric.update(summed, torch.arange(40), norms)
    want = float(np.mean([np.linalg.norm(views[v, i]) for v in range(2) for i in range(40)]))
    assert float(metric.compute()["xnorm"]) == pytest.approx(want, rel=1e-5)
    assert want < float(np.linalg.norm(views.sum(0), axis=1).mean())  # differs from the norm of the sum


# --------------------------------------------------------------------------------------------
# The evaluator's images and options
# --------------------------------------------------------------------------------------------


def _face(level: int) -> bytes:
    import simplejpeg

    img = np.zeros((16, 16, 3), dtype=np.uint8)
    img[:, :8] = level  # left half bright: a flip is visible
    return simplejpeg.encode_jpeg(img, quality=95)


def test_bin_evaluator_images_in_index_order(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from facemargin.data.formats.verification import write_bin
    from facemargin.evaluation.pairs import BinPairsEvaluator

    levels = [40 + 20 * i for i in range(8)]
    path = write_bin(tmp_path / "lfw.bin", [_face(v) for v in levels], [True, False, True, False])
    ev = BinPairsEvaluator(path)
    assert ev.name == "lfw" and ev.num_images == 8 and ev.issame.tolist() == [True, False, True, False]
    for workers in (0, 2):
        seen = []
        for images, idx in DataLoader(ev.dataset(), batch_size=3, num_workers=workers):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16) and idx.dtype == torch.long
            seen += [(int(i), int(im[0, 8, 2])) for i, im in zip(idx, images)]
        assert [i for i, _ in seen] == list(range(8))
        assert all(abs(got - levels[i]) <= 3 for i, got in seen)  # JPEG rounding only, never flipped


def test_bin_evaluator_corrupt_image_named(tmp_path: Path) -> None:
    from facemargin.data.formats.image import CorruptImageError
    from facemargin.data.formats.verification import write_bin
    from facemargin.evaluation.pairs import BinPairsEvaluator

    path = write_bin(tmp_path / "agedb_30.bin", [_face(50), b"\xff\xd8\xffjunk"], [True])
    ds = BinPairsEvaluator(path).dataset()
    with pytest.raises(CorruptImageError, match=r"agedb_30\.bin \(image 1\)"):
        ds[1]


def test_far_targets_are_chosen_by_the_user() -> None:
    assert [far_key(f) for f in (1e-1, 1e-3, 1e-6, 5e-4)] == [
        "tar@far=1e-1", "tar@far=1e-3", "tar@far=1e-6", "tar@far=5e-4"
    ]
    emb, same = planted(3000, 8, seed=9)
    got = verification_scores(emb, same, far_targets=(1e-1, 1e-2))
    assert set(got) == {"acc", "acc_std", "threshold_cosine", "xnorm", "tar@far=1e-1", "tar@far=1e-2"}
    for key, far in (("tar@far=1e-1", 0.1), ("tar@far=1e-2", 0.01)):
        assert 0.0 <= got[key] <= 1.0, key
    assert got["tar@far=1e-1"] >= got["tar@far=1e-2"]  # a looser FAR accepts at least as many


def test_null_tar_is_explained_once_per_set_and_target() -> None:
    import warnings

    emb, same = planted(300, 8, seed=5)
    have = min(int(np.sum(~same[train])) for train, _ in ref_folds(300, 10))
    metric = PairsEvaluator([b""] * 600, same, name="small_set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # three validation epochs
            metric.update(torch.tensor(emb), torch.arange(600))
            scores = metric.compute()
            metric.reset()
    assert math.isnan(scores["tar@far=1e-3"]) and math.isnan(scores["tar@far=1e-4"])
    want = {
        "tar@far=1e-3": f"FAR 0.001 needs at least 1000 negative pairs in each of the 10 training splits, this set "
                        f"has {have}; choose larger far_targets or a larger set",
        "tar@far=1e-4": f"FAR 0.0001 needs at least 10000 negative pairs in each of the 10 training splits, this set "
                        f"has {have}; choose larger far_targets or a larger set",
    }
    assert metric.notes == want
    messages = [str(w.message) for w in caught if "is null" in str(w.message)]
    assert messages == [f"small_set: {k} is null: {v}" for k, v in want.items()]  # once each, naming the set


def test_folder_pairs_refuse_mixed_sizes_naming_both_files(tmp_path: Path) -> None:
    import simplejpeg

    from facemargin.evaluation.pairs import FolderPairsEvaluator

    for person, size in (("Ann", 16), ("Bob", 20)):
        (tmp_path / person).mkdir()
        (tmp_path / person / f"{person}_0001.jpg").write_bytes(simplejpeg.encode_jpeg(np.zeros((size, size, 3), np.uint8)))
    (tmp_path / "pairs.txt").write_text("Ann 1 1\nAnn 1 Bob 1\n")
    with pytest.raises(ValueError, match=r"pairs\.txt: images differ in size: .*Bob_0001\.jpg is 20x20 but .*Ann_0001\.jpg is 16x16"):
        FolderPairsEvaluator(tmp_path / "pairs.txt", tmp_path)
    (tmp_path / "pairs.txt").write_text("Ann 1 1\nAnn 1 Ann 1\n")
    ev = FolderPairsEvaluator(tmp_path / "pairs.txt", tmp_path, nfolds=2)
    assert ev.name == tmp_path.name and ev.issame.tolist() == [True, False] and ev.num_images == 4
    image, index = ev.dataset()[3]
    assert image.shape == (3, 16, 16) and int(index) == 3


def test_runner_refuses_images_of_another_size_than_the_model_takes(tmp_path: Path) -> None:
    from facemargin.data.formats.verification import write_bin
    from facemargin.evaluation.embedder import Embedder
    from facemargin.evaluation.pairs import BinPairsEvaluator
    from facemargin.evaluation.runner import run_evaluator

    path = write_bin(tmp_path / "small_faces.bin", [_face(60), _face(90)], [True])
    model = Embedder.from_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4)))
    with pytest.raises(ValueError, match=r"small_faces: image 0 is 16x16 but the model takes 112x112 aligned faces"):
        run_evaluator(model, BinPairsEvaluator(path), num_workers=0, progress=False)
