"""Label noise on the synthetic demo set: what sub-centres and the cleaner recover.

A fraction (20 %) of the demo set's training labels is flipped to another identity, uniformly at
random (a noisy copy: the same JPEG bytes, written once as an im2rec-layout set). Then, with the
same loss and schedule everywhere:

* ``K=1``: one centre per identity, trained ``E`` epochs on the noisy labels;
* ``K=3``: three sub-centres per identity, ``E`` epochs; ``python -m facemargin.clean`` on it
  gives the cleaner's precision and recall at finding the flipped samples;
* ``K=3 -> cleaned -> K=1`` (the same budget of optimizer steps): ``E/2`` epochs with K=3,
  cleaned, then K=1 on the cleaned set starting from the cleaner's ``k1.ckpt`` (``init_weights``)
  for the steps left (more epochs of the smaller set);
* with ``--reference``, the same ``K=1`` run on the clean labels.

Reported: verification accuracy on ``demo_val.bin`` (held-out identities, insightface's 10-fold
protocol) after the last epoch, and for each cleaning: samples dropped, precision
(flipped / dropped), recall (dropped flipped / flipped) and the median angle to the dominant
sub-centre of correct and of flipped labels. Every run is in this process, one after the other, on
the CPU (the machine may be shared: accuracy, not time, is the figure). The defaults (the demo
backbone and set, E = 4: 12 epochs in all) took 263 s on a shared 2-core CPU.

    python benchmarks/label_noise.py --out /tmp/label_noise            # default: arcface, E = 4
    python benchmarks/label_noise.py --loss expface --epochs 12 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from hydra import compose, initialize_config_dir

from facemargin.clean import clean
from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.synthetic import ensure_demo_dataset
from facemargin.train import build, config_dir


#: no logger, callbacks, progress bar, model summary or checkpoints: the script saves the last weights
QUIET = ["logger=none", "callbacks=none", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
         "+trainer.enable_checkpointing=false", "+trainer.check_val_every_n_epoch=1"]


def flip_labels(root: Path, out: Path, fraction: float, seed: int) -> np.ndarray:
    """Write ``root``'s training images with ``fraction`` of the labels flipped into ``out``
    (im2rec layout: every record an image); returns the flipped mask in sample order."""
    source = FaceRecordSet(root)
    labels = source.labels().copy()
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)] = True
    shift = rng.integers(1, source.num_classes, size=len(labels))  # another identity, uniformly
    noisy = np.where(flipped, (labels + shift) % source.num_classes, labels)
    out.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(out / "train.rec", out / "train.idx") as writer:
        for i in range(len(source)):
            _, image = source.parse(i, source.read_raw(i))
            writer.write(i, pack_record(IRHeader(0, float(noisy[i]), i, 0), image))
    shutil.copy(root / "property", out / "property")
    shutil.copy(root / "demo_val.bin", out / "demo_val.bin")
    return flipped


def train(out: Path, overrides: list[str]) -> dict[str, float]:
    """One training run (``python -m facemargin.train`` with ``overrides``); its last weights go to
    ``out/final.ckpt``; returns the verification metrics of the last weights."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", *QUIET, *overrides])
    cfg.trainer.check_val_every_n_epoch = cfg.trainer.max_epochs + 1  # none while training (max_steps may end it)
    pl.seed_everything(cfg.seed, workers=True)
    trainer, model, datamodule = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(out / "final.ckpt")
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()} | {"steps": trainer.global_step}


def clean_run(ckpt: Path, data: Path, out: Path, threshold: float, flipped: np.ndarray) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("clean", overrides=[f"ckpt_path={ckpt}", f"out={out}", "data=recordio", f"data.root={data}",
                                          f"threshold={threshold}", "progress=false"])
    summary = clean(cfg)
    arrays = np.load(out / "cleaning.npz")
    dropped, angle = ~arrays["keep"], arrays["angle"]
    hits = int((dropped & flipped).sum())
    return {"dropped": int(dropped.sum()), "precision": hits / max(1, int(dropped.sum())),
            "recall": hits / max(1, int(flipped.sum())), "identities_dropped": summary["identities_dropped"],
            "median_angle_correct": float(np.median(angle[~flipped])), "median_angle_flipped": float(np.median(angle[flipped]))}


def one_seed(args: argparse.Namespace, seed: int, work: Path, demo: Path) -> dict:
    noisy = work / "noisy"
    flipped = flip_labels(demo, noisy, args.noise, seed)

    def data(root: Path) -> list[str]:
        return ["data=recordio", f"data.root={root}", "data.val_sets=[demo_val]", f"data.batch_size={args.batch}",
                f"data.num_workers={args.workers}"]

    common = [f"loss={args.loss}", f"seed={seed}", f"val_num_workers={args.workers}", *args.override]
    epochs, half = args.epochs, args.epochs // 2
    budget = epochs * (len(flipped) // args.batch)  # optimizer steps of E epochs of the noisy set
    res: dict = {"flipped": int(flipped.sum()), "samples": len(flipped), "steps": budget}
    if args.reference:
        res["K=1, clean labels"] = train(work / "k1_clean", [*common, *data(demo), f"trainer.max_epochs={epochs}"])
    res["K=1"] = train(work / "k1", [*common, *data(noisy), f"trainer.max_epochs={epochs}"])
    res["K=3"] = train(work / "k3", [*common, *data(noisy), "head.subcenters=3", f"trainer.max_epochs={epochs}"])
    res["clean K=3"] = clean_run(work / "k3" / "final.ckpt", noisy, work / "k3_cleaned", args.threshold, flipped)
    train(work / "k3_half", [*common, *data(noisy), "head.subcenters=3", f"trainer.max_epochs={half}"])
    cleaned = work / "half_cleaned"
    res["clean K=3 (E/2)"] = clean_run(work / "k3_half" / "final.ckpt", noisy, cleaned, args.threshold, flipped)
    rest = budget - half * (len(flipped) // args.batch)  # the cleaned set is smaller: same steps, more epochs
    per_epoch = max(1, (len(flipped) - res["clean K=3 (E/2)"]["dropped"]) // args.batch)
    res["K=3 -> cleaned -> K=1"] = train(work / "continued", [
        *common, *data(cleaned), f"init_weights={cleaned / 'k1.ckpt'}", f"trainer.max_epochs={math.ceil(rest / per_epoch)}",
        f"trainer.max_steps={rest}"])
    return res


def table(results: list[dict], args: argparse.Namespace) -> str:
    def acc(key: str) -> str:
        values = [r[key]["val/acc"] for r in results]
        return " / ".join(f"{v:.3f}" for v in values)

    def cleaning(key: str, field: str, fmt: str) -> str:
        return " / ".join(format(r[key][field], fmt) for r in results)

    def angles(key: str) -> str:
        return " / ".join(f"{r[key]['median_angle_correct']:.1f}° / {r[key]['median_angle_flipped']:.1f}°" for r in results)

    n, flips = results[0]["samples"], results[0]["flipped"]
    lines = [
        f"demo set: {n} training images, {flips} labels flipped ({100 * flips / n:.0f} %); loss={args.loss}, "
        f"E = {args.epochs} epochs, threshold {args.threshold:g} deg; seeds {' / '.join(map(str, args.seeds))}",
        "",
        "| model | budget | verification acc (demo_val) | cleaner: dropped | precision | recall "
        "| median angle to dominant: correct / flipped labels |",
        "|---|---|---|---|---|---|---|",
        *([f"| K=1, clean labels (reference) | E | {acc('K=1, clean labels')} | – | – | – | – |"] if args.reference else []),
        f"| K=1 | E | {acc('K=1')} | – | – | – | – |",
        f"| K=3 | E | {acc('K=3')} | {cleaning('clean K=3', 'dropped', 'd')} | {cleaning('clean K=3', 'precision', '.3f')} "
        f"| {cleaning('clean K=3', 'recall', '.3f')} | {angles('clean K=3')} |",
        f"| K=3 -> cleaned -> K=1 | E/2 + the rest of E's steps | {acc('K=3 -> cleaned -> K=1')} | {cleaning('clean K=3 (E/2)', 'dropped', 'd')} "
        f"| {cleaning('clean K=3 (E/2)', 'precision', '.3f')} | {cleaning('clean K=3 (E/2)', 'recall', '.3f')} "
        f"| {angles('clean K=3 (E/2)')} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("label_noise"))
    parser.add_argument("--loss", default="arcface")
    parser.add_argument("--epochs", type=int, default=4, help="E, epochs of the noisy set")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=75.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch", type=int, default=64, help="batch size (the demo config's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also train K=1 on the clean labels")
    parser.add_argument("--demo", default="{}", help="demo set options as JSON, e.g. '{\"num_identities\": 100}'")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every training run")
    args = parser.parse_args()
    demo = Path(ensure_demo_dataset(args.out / "cache", **json.loads(args.demo)))
    results = []
    for seed in args.seeds:
        work = args.out / f"seed{seed}"
        if work.exists():
            shutil.rmtree(work)
        results.append(one_seed(args, seed, work, demo))
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    text = table(results, args)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
