"""What ``python -m facemargin.train`` checks before the Trainer starts, so that a run that cannot
work says so at once instead of at step 1 (or by being killed):

* :func:`check_input_size`: the training images have the size the backbone takes (a 250x250
  photo set on a 112x112 backbone otherwise ends in ``mat1 and mat2 shapes cannot be multiplied``
  after the whole start-up).
* :func:`check_batches`: the set holds at least one whole batch per process (a smaller one trains
  no step and ended in ``total_steps must be positive; got 0`` from the scheduler).
* :func:`check_memory`: the model's training memory for the chosen batch against the free memory
  of the device (``backbone=iresnet100`` at the default batch on a 24 GB CPU machine was killed by
  the kernel without a message). :func:`estimate_memory` traces one forward pass of the backbone
  on the ``meta`` device (no memory, no arithmetic) and sums the tensors autograd
  keeps for the backward pass -- exactly what a real forward keeps -- then adds the weights, their
  gradients, the optimizer's state and the head's logits. ``memory_check=false`` skips the check;
  ``FACEMARGIN_FREE_MEMORY=4GiB`` states the free memory instead of measuring it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["MemoryEstimate", "check_batches", "check_input_size", "check_memory", "estimate_memory", "free_memory", "parse_bytes"]

GiB = 1 << 30
#: backward keeps the saved tensors and, at its peak, gradients of a few activations besides; the
#: allocator and the convolution kernels' workspaces add a fixed amount. Calibrated against the peak
#: RSS of two SGD steps on CPU: iresnet_demo (B 64 and 16), iresnet18 (B 32), iresnet50 (B 16) used
#: 0.8-0.97x of the estimate
BACKWARD_FACTOR = 1.4
RUNTIME_OVERHEAD = 256 << 20
#: float32 tensors per logit of the head a step holds (cosines, margin logits, softmax, their gradients)
HEAD_LOGIT_COPIES = 6
FREE_MEMORY_ENV = "FACEMARGIN_FREE_MEMORY"


# --------------------------------------------------------------------------- image size
def check_input_size(image_size: Any, backbone: Any, root: Any = None, backbone_name: str | None = None,
                     hint: str | None = None) -> None:
    """Refuse a set whose images are not the ``input_size`` x ``input_size`` the backbone takes.
    ``hint`` is how to make images of that size (the DataModule's ``size_hint``: it knows whether
    ``root`` holds photos or a packed set); without one, the advice is ``pack --crop/--resize``."""
    side = getattr(backbone, "input_size", None)
    if image_size is None or side is None:
        return
    h, w = (int(image_size[0]), int(image_size[1]))
    side = int(side)
    if (h, w) == (side, side):
        return
    name = backbone_name or type(backbone).__name__
    where = f" ({root})" if root else ""
    fix = hint or (f"make {side}x{side} face crops once: python -m facemargin.data.pack {root or 'PHOTOS'} OUT --crop 0.5 "
           f"--resize {side} (LFW-style photos; --align LANDMARKS aligns to the ArcFace template), then train with "
           "data=recordio data.root=OUT")
    if h == w:
        fix += f"; or build the backbone for {w}x{h} input: +backbone.input_size={w}"
    raise UserError(f"the training images are {w}x{h}{where} but the backbone {name} takes {side}x{side}: "
                    "the first step would fail", hint=fix)


def check_batches(num_samples: int, batch_size: int, processes: int = 1) -> None:
    """Refuse a set that holds no whole batch for each process (every step takes whole batches)."""
    if num_samples >= batch_size * processes:
        return
    per = f" x {processes} processes" if processes > 1 else ""
    raise UserError(f"the training set has {num_samples} samples, fewer than one batch ({batch_size}{per}): "
                    "no training step would run", hint=f"data.batch_size={max(num_samples // processes, 1)}")


# --------------------------------------------------------------------------- memory
def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512 MiB"``, ``"2G"``, ``"1e9"`` -> bytes (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B?)\s*", str(text))
    if not m:
        raise UserError(f"{FREE_MEMORY_ENV}={text!r}: expected a size such as 4GiB, 512MiB or 2000000000")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _cgroup_free() -> int | None:
    """What the cgroup (v2 or v1) still allows this process tree, or ``None`` without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0)
    return None


def free_memory(device: str = "cpu") -> tuple[int, str] | None:
    """``(bytes free, where)`` on ``device`` ("cpu" or a CUDA device), or ``None`` when unknown.

    ``$FACEMARGIN_FREE_MEMORY`` overrides the measurement (e.g. to test the check)."""
    if os.environ.get(FREE_MEMORY_ENV):
        return parse_bytes(os.environ[FREE_MEMORY_ENV]), f"${FREE_MEMORY_ENV}"
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    if not m:
        return None
    free = int(m.group(1)) * 1024
    cgroup = _cgroup_free()
    return (min(free, cgroup), "RAM (cgroup limit)") if cgroup is not None and cgroup < free else (free, "RAM")


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory of one process: ``fixed + per_sample * batch`` bytes."""

    fixed: int  # weights, gradients, optimizer state
    per_sample: int  # activations kept for backward, the head's logits

    def bytes(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch

    def largest_batch(self, free: int) -> int:
        """The largest batch that fits in ``free`` bytes (a multiple of 8 from 8 on; 0: none)."""
        n = max((free - self.fixed) // max(self.per_sample, 1), 0)
        return int(n if n < 8 else n - n % 8)


def _saved_bytes(backbone: Any, batch: int, side: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward of ``backbone``
    at ``batch`` x 3 x ``side`` x ``side``, traced on the meta device (weights not counted)."""
    import torch

    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in backbone.named_parameters()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in backbone.named_buffers()})
    seen = {t.untyped_storage()._cdata for t in meta.values()}  # weights (and views of them: w.t()) not counted
    kept: list[Any] = []  # keeps every saved tensor alive, so that no storage id is reused during the trace
    total = 0

    def pack(t: Any) -> Any:
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        kept.append(t)
        return t

    x = torch.empty(batch, 3, side, side, device="meta")
    seen.add(x.untyped_storage()._cdata)  # the batch is counted once, below
    was_training = backbone.training
    backbone.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.func.functional_call(backbone, meta, (x,))
    finally:
        backbone.train(was_training)
    return total + x.numel() * 4


def estimate_memory(backbone: Any, head: Any, side: int, optimizer_states: int = 1, precision: str = "32-true",
                    head_logits: int | None = None) -> MemoryEstimate:
    """The training memory of one process (see the module docstring).

    ``optimizer_states``: tensors of the size of the weights the optimizer keeps (SGD with momentum
    1, Adam 2); ``head_logits``: logits per sample this process computes (default: the head's
    number of centres)."""
    per_sample = _saved_bytes(backbone, 2, side) // 2  # 2: BatchNorm1d refuses 1 sample in training
    half = str(precision).startswith(("16", "bf16"))
    if half:  # mixed precision keeps most activations in 16 bits
        per_sample //= 2
    params = sum(p.numel() * p.element_size() for m in (backbone, head) for p in m.parameters())
    if head_logits is None:
        weight = getattr(head, "weight", None)
        head_logits = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else 0
    per_sample = int(per_sample * BACKWARD_FACTOR) + HEAD_LOGIT_COPIES * 4 * head_logits
    return MemoryEstimate(fixed=params * (2 + optimizer_states) + RUNTIME_OVERHEAD, per_sample=per_sample)


def optimizer_states(optimizer_cfg: Any) -> int:
    """Weight-sized tensors the configured optimizer keeps (unknown optimizers: 2, like Adam)."""
    target = str((optimizer_cfg or {}).get("_target_", ""))
    if target.endswith(".SGD"):
        return 1 if float((optimizer_cfg or {}).get("momentum", 0) or 0) > 0 else 0
    return 2


def check_memory(estimate: MemoryEstimate, batch: int, processes: int = 1, device: str = "cpu",
                 what: str = "this model") -> None:
    """Refuse a batch whose estimated memory (times ``processes`` sharing the device) exceeds the
    free memory: ``will not fit: needs ~X GiB for batch B, Y GiB free; data.batch_size=N fits``."""
    free = free_memory(device)
    if free is None:
        return
    available, where = free
    need = estimate.bytes(batch) * processes
    if need <= available:
        return
    fits = estimate.largest_batch(available // max(processes, 1))
    per = f" ({processes} processes)" if processes > 1 else ""
    advice = (f"data.batch_size={fits} fits" if fits else
              f"even batch 1 needs ~{estimate.bytes(1) * processes / GiB:.1f} GiB: a smaller backbone or more memory")
    raise UserError(f"will not fit: {what} needs ~{need / GiB:.1f} GiB for batch {batch}{per}, "
                    f"{available / GiB:.1f} GiB free in {where}; {advice}",
                    hint="memory_check=false skips this estimate (activations kept for backward, weights, gradients, "
                         "optimizer state and head logits)")
