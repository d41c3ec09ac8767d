"""Embeddings/s of facemargin.evaluate's runner vs a plain loop over already-decoded images.

Both embed every image of the demo ``demo_val.bin`` (600 images) and its horizontal flip with the
same model in eval mode, in the same process, alternately (A B B A A B ...). The runner
(:func:`facemargin.evaluation.runner.embed_dataset`) starts from the encoded JPEG bytes: it decodes
them (in DataLoader workers), batches uint8 images, normalises them and runs image + flip in one
forward. The plain loop gets the images decoded in advance (its decoding is not timed) and runs
``model(x) + model(flip(x))`` per batch. Goal: runner / plain >= 0.9 (median over repeats).

    python benchmarks/evaluate_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from facemargin.backbones import build_embedder
from facemargin.data.formats.image import decode_image
from facemargin.data.loading.normalize import normalize_uint8, to_uint8_chw
from facemargin.data.tools.synthetic import ensure_demo_dataset
from facemargin.evaluation import BinPairsEvaluator
from facemargin.evaluation.embedder import Embedder
from facemargin.evaluation.runner import embed_dataset


def plain_loop(model: torch.nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> float:
    """Images/s of the hand-written loop over decoded uint8 images ``[N, 3, H, W]``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            x = normalize_uint8(images[i:i + batch].to(device))
            emb = model(x) + model(torch.flip(x, dims=[3]))
            emb.cpu()
    return images.shape[0] / (time.perf_counter() - start)


def runner(model: Embedder, evaluator: BinPairsEvaluator, batch: int, workers: int) -> float:
    start = time.perf_counter()
    embed_dataset(model, evaluator.dataset(), batch, workers, progress=False, name=evaluator.name)
    return evaluator.num_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet_demo")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    evaluator = BinPairsEvaluator(ensure_demo_dataset() / "demo_val.bin")
    decoded = torch.stack([to_uint8_chw(decode_image(b)) for b in evaluator.images])
    torch.manual_seed(0)
    net = build_embedder(args.backbone).to(device).eval()
    model = Embedder.from_module(net, device=device)
    plain_loop(net, decoded[: args.batch], args.batch, device)  # warm-up (allocator, kernels)
    runner(model, evaluator, args.batch, args.workers)
    runs: dict[str, list[float]] = {"plain": [], "runner": []}
    for r in range(args.repeats):  # A B, B A, A B, ...: drifting load falls on both sides alike
        order = ("plain", "runner") if r % 2 == 0 else ("runner", "plain")
        for name in order:
            if name == "plain":
                runs[name].append(plain_loop(net, decoded, args.batch, device))
            else:
                runs[name].append(runner(model, evaluator, args.batch, args.workers))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print("| loop | median images/s | runs |\n|---|---|---|")
    for name in ("plain", "runner"):
        print(f"| {name} | {med[name]:.1f} | {', '.join(f'{r:.1f}' for r in runs[name])} |")
    print(f"ratio runner / plain = {med['runner'] / med['plain']:.3f} (goal >= 0.9); backbone={args.backbone} "
          f"images={evaluator.num_images} batch={args.batch} workers={args.workers} device={device} "
          f"threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
