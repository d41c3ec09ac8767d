"""FaceAugment: each step against an independent reference (torch / torchvision), counters, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from facemargin.data.loading.augment import FaceAugment, counter_uniform

ONLY = dict(crop_p=0.0, low_res_p=0.0, photometric_p=0.0, grayscale_p=0.0)


def faces(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth-ish uint8 images in [1, 255] (no natural zeros, so a crop's zeroed border is visible)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(1, 256, (n, 3, size // 4, size // 4), generator=g).float()
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).round().clamp(1, 255).to(torch.uint8)


def splitmix64(x: int) -> int:
    """Reference finaliser written from the published constants, in Python integers."""
    m = (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_counter_uniform_is_a_pure_hash_of_its_counters():
    m = (1 << 64) - 1
    seed, epoch, stream, idx, k = 7, 3, 2, 123456789, 5
    x = idx
    for value in ((seed << 16) + (stream << 8) + k, epoch):  # the flips' hash, under a per-draw seed
        x = (x * 0x9E3779B97F4A7C15 + value) & m
        x = splitmix64(x)
    ref = (x >> 11) / 2.0**53
    u = counter_uniform(seed, epoch, np.array([idx, -1, 0]), stream, 6)
    assert u.shape == (3, 6) and u[0, k] == ref
    big = counter_uniform(0, 0, np.arange(20_000), 1, 2)
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(big[:-1, 0], big[1:, 0])[0, 1]) < 0.03  # neighbouring samples independent
    assert abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.03  # draws of one sample independent
    for args in [(8, 3, 2), (7, 4, 2), (7, 3, 3)]:
        assert not np.array_equal(counter_uniform(*args[:2], np.array([idx]), args[2], 6)[0], u[0])


def test_crop_keeps_one_box_in_place_and_zeroes_the_rest():
    aug = FaceAugment(seed=1, **{**ONLY, "crop_p": 1.0})
    x = faces(64, size=40)
    idx = torch.arange(64)
    out = aug(x, idx, epoch=0)
    boxes = aug.params(idx, 0, 40, 40)["box"]
    areas = []
    for img, src, (t, l, h, w) in zip(out, x, boxes):
        keep = torch.zeros(40, 40, dtype=torch.bool)
        keep[t:t + h, l:l + w] = True
        assert torch.equal(img[:, keep], src[:, keep]) and not img[:, ~keep].any()
        assert 0.75 - 0.06 <= w / h <= 4 / 3 + 0.06  # aspect range, up to rounding
        areas.append(h * w / 1600)
    assert 0.19 <= min(areas) and max(areas) <= 1.0 and len({tuple(b) for b in boxes}) > 50


def test_low_res_equals_interpolate_down_then_up():
    x = faces(6, size=48)
    idx = torch.arange(6)
    for down, up in [("bilinear", "nearest"), ("area", "bicubic"), ("nearest", "bilinear")]:
        aug = FaceAugment(seed=3, **{**ONLY, "low_res_p": 1.0}, low_res_modes=(down, up), low_res_ratio=(0.25, 0.6))
        prm = aug.params(idx, 5, 48, 48)
        out = aug(x, idx, epoch=5)
        for k in range(6):
            md, mu = (aug.low_res_modes[i] for i in prm["low_res_modes"][k])
            s = tuple(int(v) for v in prm["low_res_size"][k])
            assert 12 <= s[0] <= 28 and s[0] == s[1]
            kw = lambda m: {} if m in ("nearest", "area") else {"align_corners": False}  # noqa: E731
            small = F.interpolate(x[k:k + 1].double(), size=s, mode=md, **kw(md))
            ref = F.interpolate(small, size=(48, 48), mode=mu, **kw(mu)).round().clamp(0, 255)
            assert (out[k].double() - ref[0]).abs().max() <= 1
    same = FaceAugment(**{**ONLY, "low_res_p": 1.0}, low_res_ratio=(1.0, 1.0))(x, idx, 0)
    assert torch.equal(same, x)  # ratio 1: every mode is the identity


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_photometric_matches_torchvision(op):
    aug = FaceAugment(seed=4, **{**ONLY, "photometric_p": 1.0}, brightness=0.0, contrast=0.0, saturation=0.0)
    aug.jitter[["brightness", "contrast", "saturation"].index(op)] = 0.5  # the one step that varies
    x = faces(8)
    idx = torch.arange(100, 108)
    out = aug(x, idx, epoch=2)
    factors = aug.params(idx, 2, 32, 32)["factors"][:, ["brightness", "contrast", "saturation"].index(op)]
    assert 0.5 <= factors.min() and factors.max() <= 1.5 and np.ptp(factors) > 0.3
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[op]
    for k in range(8):
        ref = fn(x[k].float() / 255, float(factors[k])) * 255
        assert (out[k].float() - ref).abs().max() <= 1.0


def test_grayscale_and_photometric_order():
    x = faces(4)
    gray = FaceAugment(**{**ONLY, "grayscale_p": 1.0})(x, torch.arange(4), 0)
    ref = TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3) * 255
    assert (gray.float() - ref).abs().max() <= 1.0
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    aug = FaceAugment(**{**ONLY, "photometric_p": 1.0})
    orders = aug.params(torch.arange(600), 0, 8, 8)["order"]
    assert {tuple(o) for o in orders} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


def test_deterministic_batch_independent_and_identical_after_resume():
    aug = FaceAugment(seed=11, crop_p=0.5, low_res_p=0.5, photometric_p=0.5, grayscale_p=0.2)
    x = faces(24)
    idx = torch.arange(1000, 1024)
    full = aug(x, idx, epoch=3)
    assert torch.equal(full, FaceAugment(seed=11, crop_p=0.5, low_res_p=0.5, photometric_p=0.5, grayscale_p=0.2)(x, idx, 3))
    # a resumed run sees the same samples in other batches (other workers, other batch boundaries)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    pieces = torch.empty_like(full)
    for part in perm.split(5):
        pieces[part] = aug(x[part], idx[part], epoch=3)
    assert torch.equal(pieces, full)
    assert (full != x).flatten(1).any(1).sum() >= 12  # most samples were changed ...
    assert not torch.equal(aug(x, idx, epoch=4), full)  # ... differently in another epoch
    assert not torch.equal(FaceAugment(seed=12, crop_p=0.5, low_res_p=0.5, photometric_p=0.5)(x, idx, 3), full)
    assert torch.equal(FaceAugment(**ONLY)(x, idx, 3), x) and torch.equal(x, faces(24))  # input untouched


def test_bad_input_is_refused():
    aug = FaceAugment()
    with pytest.raises(ValueError, match=r"uint8 images \[B, 3, H, W\], got torch.float32"):
        aug(torch.zeros(2, 3, 8, 8), torch.arange(2), 0)
    with pytest.raises(ValueError, match="2 images but 3 sample indices"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.arange(3), 0)
    with pytest.raises(ValueError, match="crop_p must be in"):
        FaceAugment(crop_p=1.5)
    with pytest.raises(ValueError, match="low_res_modes must be a non-empty subset"):
        FaceAugment(low_res_modes=("lanczos",))
    with pytest.raises(ValueError, match="crop_scale must be 0 < low <= high <= 1.0"):
        FaceAugment(crop_scale=(0.5, 0.2))


def test_augmented_training_batches_are_identical_after_a_mid_epoch_resume(tmp_path):
    import lightning.pytorch as pl

    from facemargin.data.module import FaceRecordDataModule
    from facemargin.data.tools.synthetic import make_demo_dataset

    root = make_demo_dataset(tmp_path / "set", num_identities=4, images_per_identity=6, num_val_identities=2,
                             num_val_pairs=10, image_size=16, seed=1)

    class Seen(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.seen: dict[tuple, torch.Tensor] = {}

        def training_step(self, batch, batch_idx):
            x, _, index = batch
            self.seen[(self.current_epoch, *index.tolist())] = x.clone()
            return self.lin(x.mean(dim=(2, 3))).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class CrashAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (trainer.current_epoch, batch_idx) == (1, 2):
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                raise RuntimeError("simulated crash")

    def fit(model, *callbacks, ckpt=None):
        dm = FaceRecordDataModule(root, batch_size=4, num_workers=0, seed=2,
                                  augment=FaceAugment(seed=2, crop_p=0.5, low_res_p=0.5, photometric_p=0.5, grayscale_p=0.3))
        pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                   callbacks=list(callbacks)).fit(model, dm, ckpt_path=ckpt)

    full, resumed = Seen(), Seen()
    fit(full)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(Seen(), CrashAt())
    fit(resumed, ckpt=tmp_path / "mid.ckpt")
    assert len(full.seen) == 18 and len(resumed.seen) == 18 - 9
    for key, x in resumed.seen.items():
        assert torch.equal(x, full.seen[key])  # same samples, same augmentation, bit for bit


def test_data_augment_adaface_config_is_off_by_default_and_builds_adafaces_set():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from facemargin.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        assert compose("config").data.augment is None
        assert compose("config", overrides=["data=folder", "data.root=/x"]).data.augment is None
        cfg = compose("config", overrides=["data/augment=adaface", "seed=11"])
    augment = instantiate(cfg.data.augment)
    x, index = faces(64), torch.arange(64)
    y = augment(x, index, 1)
    assert torch.equal(y, FaceAugment(seed=11)(x, index, 1))  # the config holds the class defaults, the run's seed
    changed = (y != x).flatten(1).any(1).float().mean().item()
    assert 0.2 < changed < 0.8  # three steps at p = 0.2: about 1 - 0.8**3 = 49 % of the samples touched
