"""Clean a noisy training set with a sub-centre model (Sub-center ArcFace, Deng et al., ECCV 2020)::

    python -m facemargin.clean ckpt_path=RUN/checkpoints/last.ckpt data=recordio data.root=SET out=CLEAN

``ckpt_path`` is a model trained with ``head.subcenters=K`` on ``data``. The cleaner

1. embeds every training sample with the checkpoint's backbone (the image alone, as insightface's
   ``drop.py``; ``flip=true`` sums it with its mirror image);
2. per class, finds the dominant sub-centre (the one most of its samples are nearest to) and drops
   the samples farther than ``threshold`` degrees (75) from it
   (:func:`facemargin.heads.subcenters.clean_by_dominant_subcentre`);
3. writes into ``out``, which training reads directly, with no re-packing of images:

   - RecordIO sets: ``train.idx`` listing the kept image records at their offsets in the original
     ``train.rec`` (linked, not copied), ``train.idx.subset`` (says the index leaves records out on
     purpose), ``property`` and links to the set's ``*.bin`` files:
     ``data=recordio data.root=OUT``;
   - image folders and list files: ``train.lst`` of ``path label`` lines:
     ``data=folder data.root=OUT/train.lst data.num_classes=C``;
   - ``k1.ckpt`` (``drop_subcenters=true``): the checkpoint with each class's dominant sub-centre
     only and ``head.subcenters=1``; a new run starts from it with ``init_weights=OUT/k1.ckpt``;
   - ``clean.json`` (what was dropped, the command to train on the result) and ``cleaning.npz``
     (per sample: ``label``, ``keep``, ``angle`` to the dominant sub-centre in degrees,
     ``nearest`` sub-centre; per class: ``dominant``, ``counts``).

Labels keep the model's numbering (an identity left without samples keeps its centre as a
negative), so ``k1.ckpt`` and the cleaned set fit together.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from .data.formats.image import decode_face
from .data.loading.normalize import to_uint8_chw
from .data.sources.base import FaceSource
from .data.sources.folder import FolderSource
from .data.sources.recordio import FaceRecordSet
from .heads.subcenters import CleaningResult, clean_by_dominant_subcentre, dominant_weights

__all__ = ["SourceImages", "clean", "main", "write_cleaned_set", "write_k1_checkpoint"]

log = logging.getLogger(__name__)

#: files a cleaning run writes into ``out`` (refused when one is already there)
OUTPUTS = ("train.idx", "train.idx.subset", "train.lst", "k1.ckpt", "clean.json", "cleaning.npz")


class SourceImages(Dataset):
    """Sample ``i`` of a training source as ``(uint8 [3, H, W] RGB, i)``, in storage order."""

    def __init__(self, source: FaceSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, data = self.source.parse(i, self.source.read_raw(i))
        try:
            image = decode_face(data, self.source.image_size)
        except ValueError as exc:
            raise type(exc)(f"{self.source.where(i)}: {exc}") from None
        return to_uint8_chw(image), torch.tensor(i)


def subcentre_weights(module: torch.nn.Module, where: str) -> tuple[torch.Tensor, int]:
    """The head's class-major centres ``[C * K, D]`` (all of them: checkpoints are consolidated) and K."""
    head = module.head
    weight = getattr(head, "weight", None)
    k = getattr(head, "subcenters", None)
    if not isinstance(weight, torch.Tensor) or k is None:
        raise ValueError(f"{where}: the head ({type(head).__name__}) has no class centres with sub-centres")
    if weight.shape[0] != module.num_classes * k:
        raise ValueError(f"{where}: head.weight has {weight.shape[0]} rows, not {module.num_classes} classes x {k}")
    return weight.detach(), int(k)


def write_k1_checkpoint(module: torch.nn.Module, dominant: torch.Tensor, path: Path) -> None:
    """``module`` with each class's dominant sub-centre only, recorded as ``head.subcenters=1``:
    a checkpoint :func:`facemargin.checkpoint.load_module` and ``init_weights`` read."""
    from .module import RECORD_KEY

    weight, k = subcentre_weights(module, str(path))
    state = {name: t.detach().cpu() for name, t in module.state_dict().items()}
    state["head.weight"] = dominant_weights(weight, dominant, k).cpu()
    record = copy.deepcopy(module.record())
    record["config"]["head"]["subcenters"] = 1
    torch.save({"state_dict": state, RECORD_KEY: record}, path)


def _link(target: Path, link: Path) -> None:
    try:
        os.symlink(target.resolve(), link)
    except OSError:  # no symlinks here (some filesystems, Windows): a hard link, still no copy
        os.link(target.resolve(), link)


def write_cleaned_set(source: FaceSource, keep: np.ndarray, out: Path) -> dict[str, Any]:
    """Write the kept samples of ``source`` into ``out`` as a set training reads directly; returns
    the ``data`` overrides that train on it."""
    if isinstance(source, FaceRecordSet):
        if not isinstance(source.root, Path):
            raise ValueError(f"{source.name}: a remote RecordIO set cannot be cleaned in place; copy it locally first")
        pos = source.positions(np.flatnonzero(keep))
        keys, offsets = source.index.keys[pos], source.index.offsets[pos]
        # no meta record (key 0) in the new index: every listed key is an image (im2rec layout)
        (out / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist())))
        (out / "train.idx.subset").write_text(  # the records left out are not deleted lines: readers skip them
            f"train.idx lists {len(keys)} of the records of train.rec on purpose (facemargin.clean)\n")
        _link(Path(source.rec_path), out / "train.rec")
        prop = Path(source.property_path)
        h, w = source.image_size or (0, 0)
        (out / "property").write_text(prop.read_text() if prop.is_file() else f"{source.num_classes},{h},{w}")
        bins = sorted(source.root.glob("*.bin"))
        for bin_file in bins:
            _link(bin_file, out / bin_file.name)
        overrides: dict[str, Any] = {"data": "recordio", "data.root": str(out)}
        if bins:
            overrides["data.val_sets"] = "[" + ",".join(b.stem for b in bins) + "]"
        return overrides
    if isinstance(source, FolderSource):
        lines = []
        labels = source.labels()
        for i in np.flatnonzero(keep).tolist():
            path = str(Path(source.path(i)).resolve())
            if "\n" in path or "\r" in path or "\t" in path:
                raise ValueError(f"{path!r}: a path with a line break or a tab cannot go into a list file")
            lines.append(f"{path}\t{int(labels[i])}\n")  # a tab: paths may hold spaces
        (out / "train.lst").write_text("".join(lines), encoding="utf-8")
        return {"data": "folder", "data.root": str(out / "train.lst"), "data.num_classes": source.num_classes}
    raise ValueError(
        f"cannot write a cleaned copy of a {type(source).__name__} ({source.name}): the cleaner writes RecordIO "
        "subsets and folder list files; use cleaning.npz's keep mask with your own source"
    )


def _check_out(out: Path, source: FaceSource) -> None:
    root = Path(getattr(source, "root", source.name)).expanduser()
    data_dir = root if root.is_dir() else root.parent
    if out.resolve() == data_dir.resolve():
        raise ValueError(f"out={out} is the training set's own folder; choose a new folder")
    taken = [name for name in OUTPUTS if (out / name).exists()]
    if taken:
        raise FileExistsError(f"out={out} already holds {', '.join(taken)} from a cleaning run; choose a new folder")


def clean(cfg: DictConfig) -> dict[str, Any]:
    """Run the cleaner on a composed ``conf/clean.yaml`` config; returns what it wrote to ``clean.json``."""
    from hydra.utils import instantiate

    from .checkpoint import load_module
    from .evaluation.embedder import Embedder
    from .evaluation.runner import embed_dataset

    ckpt = Path(cfg.ckpt_path).expanduser()
    module = load_module(ckpt)
    weight, k = subcentre_weights(module, str(ckpt))
    source = instantiate(cfg.data).source
    if source.num_classes != module.num_classes:
        raise ValueError(
            f"{ckpt} was trained on {module.num_classes} identities, the set {source.name} has {source.num_classes}: "
            "clean the set the model was trained on"
        )
    out = Path(cfg.out).expanduser()
    _check_out(out, source)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    embedder = Embedder.from_module(module.backbone, module.record(), None, str(ckpt), device)
    emb, _ = embed_dataset(embedder, SourceImages(source), cfg.batch_size, cfg.num_workers, cfg.progress,
                           "training set", flip=cfg.flip)
    labels = np.asarray(source.labels(), dtype=np.int64)
    result = clean_by_dominant_subcentre(torch.from_numpy(emb), torch.from_numpy(labels), weight.cpu(), k, cfg.threshold)
    out.mkdir(parents=True, exist_ok=True)
    keep = result.keep.numpy()
    if not keep.any():
        raise ValueError(f"every sample is farther than {cfg.threshold} degrees from its dominant sub-centre")
    overrides = write_cleaned_set(source, keep, out)
    if cfg.drop_subcenters:
        write_k1_checkpoint(module, result.dominant, out / "k1.ckpt")
        overrides["init_weights"] = str(out / "k1.ckpt")
    _save_arrays(result, labels, out / "cleaning.npz")
    summary = _summary(cfg, ckpt, source, result, labels, k, overrides)
    (out / "clean.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save_arrays(result: CleaningResult, labels: np.ndarray, path: Path) -> None:
    np.savez(path, label=labels, keep=result.keep.numpy(), angle=result.angle.numpy(), nearest=result.nearest.numpy(),
             dominant=result.dominant.numpy(), counts=result.counts.numpy())


def _summary(cfg: DictConfig, ckpt: Path, source: FaceSource, result: CleaningResult, labels: np.ndarray, k: int,
             overrides: dict[str, Any]) -> dict[str, Any]:
    identities, identities_dropped = result.identities(torch.from_numpy(labels))
    n = int(labels.size)
    command = " ".join(["python -m facemargin.train", *(f"{key}={value}" for key, value in overrides.items())])
    return {
        "checkpoint": str(ckpt), "set": source.name, "subcenters": k, "threshold_deg": float(cfg.threshold),
        "flip": bool(cfg.flip), "samples": n, "samples_kept": n - result.dropped_samples,
        "samples_dropped": result.dropped_samples, "identities": identities,
        "identities_dropped": identities_dropped, "num_classes": int(source.num_classes),
        "non_dominant_samples": int((result.nearest != result.dominant[torch.from_numpy(labels)]).sum()),
        "train": command,
    }


def main() -> None:
    import hydra

    from .train import config_dir

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="clean")
    def _run(cfg: DictConfig) -> None:
        s = clean(cfg)
        log.info(
            "dropped %d of %d samples (%.2f%%) and %d of %d identities (> %g degrees from the dominant of %d "
            "sub-centres); wrote %s", s["samples_dropped"], s["samples"], 100.0 * s["samples_dropped"] / s["samples"],
            s["identities_dropped"], s["identities"], s["threshold_deg"], s["subcenters"], Path(cfg.out) / "clean.json",
        )
        log.info("train on it (with the run's other options): %s", s["train"])

    _run()


if __name__ == "__main__":
    main()
