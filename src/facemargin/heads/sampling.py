"""Partial FC centre sampling (``sample_rate < 1``), a function of counters, not of an RNG's history.

Each training step keeps every positive class of the global batch on this shard plus a uniform
sample of the others, ``ceil(sample_rate * C_local)`` classes in all, copies their centre rows
(all K sub-centres of a picked class) into the fixed-size Parameter ``weight_active`` (what the
optimizer sees) and swaps their optimizer-state rows in; a step post-hook writes rows and state back after ``optimizer.step()``. Rows not
sampled are untouched, weights and optimizer state alike. The full-shard optimizer state lives
in the optimizer's own state under ``partial_fc_full_<key>``, so it is saved with the optimizer.

The sample of step ``k`` on rank ``r`` is drawn from a generator seeded with
``(sample_seed, k, r)`` (both counters are buffers of the head, saved in checkpoints), so a
resumed run samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from ..distributed import all_reduce_max
from .sharding import FULL_STATE_PREFIX, param_index

__all__ = ["CentreSampling", "counter_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def counter_seed(*counters: int) -> int:
    """A 63-bit generator seed that depends on every counter (splitmix64, chained)."""
    x = 0
    for c in counters:
        x = _splitmix64(x ^ (int(c) & _MASK64))
    return x & ((1 << 63) - 1)


class CentreSampling:
    """The sampling half of :class:`~facemargin.heads.PartialFCHead` (a mixin: it uses the head's
    ``weight`` buffer, ``weight_active`` Parameter, ``sample_seed`` / ``sample_step`` buffers,
    ``num_local``, ``num_sample``, ``rank`` and ``world_size``)."""

    def _init_sampling(self) -> None:
        self._optimizers: list[weakref.ref] = []
        self._hooks: list[Any] = []
        self._active_index: Tensor | None = None
        self._pending = False

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Register ``optimizer`` (call once, e.g. in ``configure_optimizers``).

        For ``sample_rate < 1`` the head swaps the sampled rows' optimizer state in at each
        training step and writes rows and state back in a step post-hook. A no-op when
        ``sample_rate == 1`` or when ``optimizer`` does not hold ``weight_active``.
        """
        if not self.sampled or param_index(optimizer, self.weight_active) is None:
            return
        if any(ref() is optimizer for ref in self._optimizers):
            return
        self._optimizers.append(weakref.ref(optimizer))
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _attached(self) -> list[torch.optim.Optimizer]:
        opts = [ref() for ref in self._optimizers]
        return [o for o in opts if o is not None and param_index(o, self.weight_active) is not None]

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Step post-hook: write the sampled rows and their optimizer state back to the shard."""
        idx = self._active_index
        if idx is None or not self._pending:
            return
        p = self.weight_active
        with torch.no_grad():
            self.weight.index_copy_(0, idx, p.detach().to(self.weight.dtype))
            state = optimizer.state.get(p, {})
            for key, val in list(state.items()):
                if key.startswith(FULL_STATE_PREFIX) or not torch.is_tensor(val) or val.shape != p.shape:
                    continue
                full = state.get(FULL_STATE_PREFIX + key)
                if full is None:
                    rows = self.weight.shape[0]
                    full = torch.zeros(rows, *p.shape[1:], dtype=val.dtype, device=val.device)
                    state[FULL_STATE_PREFIX + key] = full
                full.index_copy_(0, idx, val)
        self._pending = False

    def _sample(self, local: Tensor) -> Tensor:
        """Pick the active classes (positives + uniform others), load their rows, remap ``local``."""
        opts = self._attached()
        if not opts:
            raise RuntimeError(
                "PartialFCHead(sample_rate<1) needs head.attach_optimizer(optimizer) before training "
                "(call it in configure_optimizers)"
            )
        if self._pending and self.weight_active.grad is not None:
            raise RuntimeError(
                "PartialFCHead(sample_rate<1): a new sample before optimizer.step() consumed the last "
                "one; gradient accumulation is not supported with sampling (use sample_rate=1)"
            )
        k, n_local, device = self.num_sample, self.num_local, local.device
        positive = torch.zeros(n_local, dtype=torch.bool, device=device)
        positive[local[local >= 0]] = True
        n_pos = int(positive.sum())
        # decide together: one rank raising alone would hang the others
        overflow = int(all_reduce_max(torch.tensor([n_pos - k], device=device)))
        if overflow > 0:
            raise ValueError(
                f"the global batch has more positive classes on a shard than the {k} sampled "
                f"centres (this rank: {n_pos}; sample_rate={self.sample_rate}, C_local={n_local}); "
                "raise sample_rate"
            )
        gen = torch.Generator(device=device)
        gen.manual_seed(counter_seed(int(self.sample_seed), int(self.sample_step), self.rank))
        score = torch.rand(n_local, generator=gen, device=device)
        score[positive] = 2.0
        classes = torch.topk(score, k, sorted=False).indices.sort().values
        self.sample_step.add_(1)
        remap = torch.full((n_local,), -1, dtype=torch.long, device=device)
        remap[classes] = torch.arange(k, device=device)
        new_local = torch.where(local >= 0, remap[local.clamp_min(0)], local)
        per = self.subcenters  # a class's rows are contiguous: class c holds rows c*K .. c*K+K-1
        idx = (classes.unsqueeze(1) * per + torch.arange(per, device=device)).view(-1)
        with torch.no_grad():
            torch.index_select(self.weight, 0, idx, out=self.weight_active.data)
            for opt in opts:
                state = opt.state.get(self.weight_active, {})
                for key in [k_ for k_ in state if k_.startswith(FULL_STATE_PREFIX)]:
                    name, full = key[len(FULL_STATE_PREFIX):], state[key]
                    cur = state.get(name)
                    if torch.is_tensor(cur) and cur.shape == (idx.numel(), *full.shape[1:]) and cur.dtype == full.dtype:
                        torch.index_select(full, 0, idx, out=cur)
                    else:
                        state[name] = full.index_select(0, idx)
        self._active_index, self._pending = idx, True
        return new_local

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_optimizers"], state["_hooks"] = [], []
        return state
