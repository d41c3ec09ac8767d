"""A batch as one tensor, written by DataLoader workers into shared memory they reuse.

Handing a batch from a worker to the training process the usual way (returning tensors) moves
each tensor into *fresh* shared memory when it is pickled: a new ``/dev/shm`` file, a file
descriptor sent over a socket and ~1,200 first-touch page faults per 128-image batch, per tensor.
Here instead:

* :class:`PackedLayout`: a batch is one uint8 buffer -- labels (int64 ``[B]``), sample indices
  (int64 ``[B]``), flips (bool ``[B]``), then the images (uint8 ``[B, H, W, 3]``, 64-byte
  aligned) -- viewed in place by both sides.
* :class:`SlotRing`: the training process allocates, before it starts the workers, ``slots``
  such buffers per worker in one shared storage (``prefetch_factor + 1``: enough that a worker
  never waits, see below); the workers inherit it. A worker returns a :class:`PackedBatch`
  naming its slot -- a few integers to pickle, no tensor, no file descriptor.
* Reuse is counted, not flagged: worker ``w`` writes its ``t``-th ring batch of an iteration into
  slot ``t % slots``, and only once the training process has copied out its batch ``t - slots``.
  The training process copies each batch out as it delivers it (into pinned memory when pinning:
  the copy the pin thread would make anyway) and counts it; every request it sends carries a
  :class:`SlotTicket` with those counts (and the iteration), so the news travels through the
  DataLoader's own queues, whose ordering makes it safe. With ``prefetch_factor`` requests in
  flight per worker the count a worker sees is ``prefetch_factor`` behind its own, so
  ``prefetch_factor + 1`` slots suffice; were one still busy, the worker returns a fresh buffer
  instead (never waits, never overwrites).
* A new iteration (epoch, resume) restarts the counts on both sides: persistent workers finish
  and the DataLoader discards the old iteration's requests before any new one is sent. A new set
  of workers gets a new ring (older workers that are still shutting down keep writing theirs).

A request without a ring (``num_workers=0``, a fallback) gets a fresh buffer: the same layout.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import numpy as np
import torch

from .layout import HWCImages, to_training_layout

__all__ = ["PackedLayout", "PackedBatch", "SlotTicket", "SlotRing", "NO_RING", "unpack"]

_ALIGN = 64
_ids = itertools.count(1)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class PackedLayout(NamedTuple):
    """Where labels, indices, flips and images of a ``batch`` of ``height x width`` images lie in one buffer."""

    batch: int
    height: int
    width: int

    @property
    def pixels_at(self) -> int:
        return _aligned(17 * self.batch)

    @property
    def nbytes(self) -> int:
        """The buffer's size (a multiple of 64, so that buffers can lie back to back)."""
        return _aligned(self.pixels_at + self.batch * self.height * self.width * 3)

    def views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pixels uint8 [B, H, W, 3], labels int64 [B], index int64 [B], flip bool [B])`` views of ``buffer``."""
        b, p = self.batch, self.pixels_at
        return (buffer[p: p + b * self.height * self.width * 3].view(b, self.height, self.width, 3),
                buffer[: 8 * b].view(torch.int64), buffer[8 * b: 16 * b].view(torch.int64),
                buffer[16 * b: 17 * b].view(torch.bool))

    def numpy_views(self, buffer: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The same views as numpy arrays (what the worker writes through)."""
        return tuple(v.numpy() for v in self.views(buffer))  # type: ignore[return-value]


class SlotTicket(NamedTuple):
    """Carried by every request of a ring: which ring, which iteration, and per worker the ring batches copied out."""

    ring: int
    generation: int
    consumed: tuple[int, ...]


#: The ticket of a loader without workers: batches come packed, in fresh buffers.
NO_RING = SlotTicket(0, 0, ())


class PackedBatch(NamedTuple):
    """What a worker returns: the batch's ``layout`` and either its ``buffer`` or the ring ``slot`` holding it."""

    layout: PackedLayout
    buffer: torch.Tensor | None
    ring: int = 0
    worker: int = -1
    slot: int = -1


class SlotRing:
    """``slots`` packed batch buffers per worker in one shared storage (see the module docstring).

    Made in the training process before the workers start; the workers hold a copy of this object
    (the same shared memory). :meth:`claim` / :meth:`filled` run in a worker, the rest in the
    training process.
    """

    def __init__(self, workers: int, slots: int, layout: PackedLayout) -> None:
        if workers < 1 or slots < 1:
            raise ValueError(f"SlotRing: workers and slots must be >= 1, got {workers} and {slots}")
        self.id = (os.getpid() << 20) + next(_ids)  # unique among the rings of this process tree
        self.workers, self.slots, self.layout = int(workers), int(slots), layout
        storage = torch.UntypedStorage._new_shared(self.workers * self.slots * layout.nbytes)
        self.buffers = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (self.workers, self.slots, layout.nbytes))
        self.generation = 0
        self.consumed = [0] * self.workers  # training process: ring batches copied out, per worker
        self._made = 0  # worker: ring batches written in this generation

    # ---- training process
    def restart(self) -> None:
        """A new iteration: counts start again on both sides."""
        self.generation += 1
        self.consumed = [0] * self.workers

    def ticket(self) -> SlotTicket:
        return SlotTicket(self.id, self.generation, tuple(self.consumed))

    def slot(self, worker: int, slot: int) -> torch.Tensor:
        """The bytes of ``worker``'s ``slot``."""
        return self.buffers[worker, slot]

    def release(self, worker: int) -> None:
        """``worker``'s oldest ring batch was copied out: its slot may be written again."""
        self.consumed[worker] += 1

    # ---- worker
    def claim(self, ticket: SlotTicket, worker: int, layout: PackedLayout) -> int | None:
        """The slot ``worker`` writes its next batch into, or ``None`` (use a fresh buffer) if none is free."""
        if ticket.ring != self.id or layout != self.layout or not 0 <= worker < len(ticket.consumed):
            return None
        if ticket.generation != self.generation:
            self.generation, self._made = ticket.generation, 0
        if self._made - ticket.consumed[worker] >= self.slots:
            return None
        return self._made % self.slots

    def filled(self) -> None:
        """The claimed slot holds a finished batch."""
        self._made += 1


def unpack(layout: PackedLayout, buffer: torch.Tensor, layout_on_device: bool, copy: bool = False,
           pin: bool = False) -> tuple:
    """A packed batch -> ``(uint8 [B, 3, H, W], labels, index)``, or with ``layout_on_device``
    ``(HWCImages, labels, index)`` for the device to finish (:func:`~facemargin.data.loading.layout.to_training_layout`).

    ``copy``: ``buffer`` is a ring slot: nothing returned may alias it (the HWC batch is copied
    into a fresh buffer, pinned when ``pin``).
    """
    pixels, labels, index, flip = layout.views(buffer)
    if not layout_on_device:
        return to_training_layout(HWCImages(pixels, flip)), labels.clone(), index.clone()
    if copy:
        own = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        own.copy_(buffer)
        pixels, labels, index, flip = layout.views(own)
    return HWCImages(pixels, flip), labels, index
