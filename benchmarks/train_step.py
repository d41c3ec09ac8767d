"""Lightning training step of FaceRecognitionModule vs a hand-written PyTorch loop.

Same model, head, optimizer, data and process; the two are run alternately (A B A B ...) and the
median time per step over the measured steps is compared. Goal: Lightning / plain <= 1.03.

    python benchmarks/train_step.py --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from facemargin.backbones import build_embedder
from facemargin.heads import MarginHead
from facemargin.module import FaceRecognitionModule


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = batch_idx + 1 - self.warmup


def make_module(args: argparse.Namespace) -> FaceRecognitionModule:
    torch.manual_seed(0)
    return FaceRecognitionModule(
        backbone=build_embedder(args.backbone, embedding_size=128),
        head=MarginHead(128, args.classes, margin="expface"),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )


def lightning_run(args: argparse.Namespace, loader: DataLoader) -> float:
    module = make_module(args)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.steps


def plain_run(args: argparse.Namespace, loader: DataLoader) -> float:
    module = make_module(args)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    start, steps = 0.0, 0
    for i, (images, labels) in enumerate(loader):
        if i == args.warmup:
            start = time.perf_counter()
        loss = module.head.loss(module.backbone(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps = i + 1 - args.warmup
        if i + 1 == args.steps:
            break
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet_demo")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    data = TensorDataset(torch.randn(n, 3, 112, 112, generator=g), torch.randint(0, args.classes, (n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, drop_last=True)
    lightning_times, plain_times = [], []
    for _ in range(args.repeats):
        plain_times.append(plain_run(args, loader))
        lightning_times.append(lightning_run(args, loader))
    pl_med, plain_med = statistics.median(lightning_times), statistics.median(plain_times)
    print(f"| loop | median s/step | runs |\n|---|---|---|")
    print(f"| plain PyTorch | {plain_med:.4f} | {', '.join(f'{t:.4f}' for t in plain_times)} |")
    print(f"| Lightning | {pl_med:.4f} | {', '.join(f'{t:.4f}' for t in lightning_times)} |")
    print(f"ratio Lightning / plain = {pl_med / plain_med:.3f} (goal <= 1.03); backbone={args.backbone} "
          f"batch={args.batch} classes={args.classes} threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
