"""A batch as one tensor, written by DataLoader workers into shared memory they reuse.

Handing a batch from a worker to the training process the usual way (returning tensors) moves
each tensor into *fresh* shared memory when it is pickled: a new ``/dev/shm`` file, a file
descriptor sent over a socket and ~1,200 first-touch page faults per 128-image batch, per tensor.
Here instead:

* :class:`PackedLayout`: a batch is one uint8 buffer -- labels (int64 ``[B]``), sample indices
  (int64 ``[B]``), flips (bool ``[B]``), then the images (uint8 ``[B, H, W, 3]``, 64-byte
  aligned) -- viewed in place by both sides.
* :class:`SlotRing`: the training process allocates, before it starts the workers, ``slots``
  such buffers per worker in one shared storage; the workers inherit it. A worker returns a
  :class:`PackedBatch` naming its slot -- a few integers to pickle, no tensor, no file descriptor.
  Slots it never needs are never touched (no memory behind them).
* A slot is busy while its batch is written and not yet delivered, or delivered and still in
  use. The training process hands a batch out either in place (the tensors view the slot, which
  stays busy until the last of them is freed: a ``weakref.finalize`` clears its bit) or as a
  copy (into pinned memory when pinning: the copy the pin thread would make anyway), the slot
  free at once. Every request it sends carries a :class:`SlotTicket`: per worker, the ring
  batches delivered in this iteration and the bit mask of slots still in use. The news travels
  through the DataLoader's own queues, whose ordering makes it safe, and a worker writes only into
  a slot that is neither in flight (written, not yet delivered, by its own count) nor in use;
  if none is free it returns a fresh buffer instead (never waits, never overwrites).
* A new iteration (epoch, resume) restarts the delivery counts on both sides: persistent workers
  finish and the DataLoader discards the old iteration's requests before any new one is sent;
  slots still in use stay busy. A new set of workers gets a new ring (older workers that are
  still shutting down keep writing theirs).

A request without a ring (``num_workers=0``, a fallback) gets a fresh buffer: the same layout.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
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
    """Carried by every request of a ring: which ring, which iteration, and per worker the ring batches
    delivered in it and the slots whose delivered batch is still in use (a bit mask)."""

    ring: int
    generation: int
    delivered: tuple[int, ...]
    held: tuple[int, ...]


#: The ticket of a loader without workers: batches come packed, in fresh buffers.
NO_RING = SlotTicket(0, 0, (), ())


class PackedBatch(NamedTuple):
    """What a worker returns: the batch's ``layout`` and either its ``buffer`` or the ring ``slot`` holding it
    (``seq``: the worker's ring batches before it in this iteration)."""

    layout: PackedLayout
    buffer: torch.Tensor | None
    ring: int = 0
    worker: int = -1
    slot: int = -1
    seq: int = -1


class SlotRing:
    """``slots`` packed batch buffers per worker in one shared storage (see the module docstring).

    Made in the training process before the workers start; the workers hold a copy of this object
    (the same shared memory). :meth:`claim` / :meth:`filled` run in a worker, the rest in the
    training process.
    """

    def __init__(self, workers: int, slots: int, layout: PackedLayout) -> None:
        if workers < 1 or not 1 <= slots <= 62:
            raise ValueError(f"SlotRing: workers must be >= 1 and slots in [1, 62], got {workers} and {slots}")
        self.id = (os.getpid() << 20) + next(_ids)  # unique among the rings of this process tree
        self.workers, self.slots, self.layout = int(workers), int(slots), layout
        storage = torch.UntypedStorage._new_shared(self.workers * self.slots * layout.nbytes)
        self.buffers = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (self.workers, self.slots, layout.nbytes))
        self.generation = 0
        self.delivered = [0] * self.workers  # training process: ring batches handed out, per worker
        self.held = [0] * self.workers  # training process: slots whose batch is still referenced (bits)
        self._lock = threading.Lock()  # held bits are cleared by whichever thread frees a batch
        self._written: list[int] = []  # worker: the slots of its ring batches in this generation, in order

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    # ---- training process
    def restart(self) -> None:
        """A new iteration: its batches are counted from 0 (the old one's were delivered or discarded)."""
        self.generation += 1
        self.delivered = [0] * self.workers

    def ticket(self) -> SlotTicket:
        with self._lock:
            return SlotTicket(self.id, self.generation, tuple(self.delivered), tuple(self.held))

    def slot(self, worker: int, slot: int) -> torch.Tensor:
        """The bytes of ``worker``'s ``slot``."""
        return self.buffers[worker, slot]

    def deliver(self, batch: PackedBatch, hold: bool) -> torch.Tensor:
        """The slot of ``batch`` (the next one of its worker); ``hold``: the returned tensor keeps the slot
        busy until it (and every view of it) is freed, else the slot is free again at once (copy it first)."""
        w = batch.worker
        if batch.ring != self.id or batch.seq != self.delivered[w]:
            raise RuntimeError(f"slot ring {self.id}: got batch {batch.seq} of ring {batch.ring} from worker {w}, "
                               f"expected batch {self.delivered[w]}")
        self.delivered[w] += 1
        data = self.slot(w, batch.slot)
        if not hold:
            return data
        view = data.numpy()[:]  # a fresh array: the tensor made from it keeps it alive, and no longer
        bit = 1 << batch.slot
        with self._lock:
            self.held[w] |= bit
        weakref.finalize(view, self._free, w, bit)
        return torch.frombuffer(view, dtype=torch.uint8)

    def _free(self, worker: int, bit: int) -> None:
        with self._lock:
            self.held[worker] &= ~bit

    # ---- worker
    def claim(self, ticket: SlotTicket, worker: int, layout: PackedLayout) -> int | None:
        """A free slot for ``worker``'s next batch, or ``None`` (use a fresh buffer): neither written in this
        iteration and not yet delivered, nor holding a delivered batch still in use."""
        if ticket.ring != self.id or layout != self.layout or not 0 <= worker < len(ticket.delivered):
            return None
        if ticket.generation != self.generation:
            self.generation, self._written = ticket.generation, []
        busy = ticket.held[worker]
        for k in self._written[ticket.delivered[worker]:]:
            busy |= 1 << k
        for k in range(self.slots):
            if not busy >> k & 1:
                return k
        return None

    def filled(self, slot: int) -> int:
        """``slot`` holds a finished batch: its number among this iteration's ring batches."""
        self._written.append(slot)
        return len(self._written) - 1


def unpack(layout: PackedLayout, buffer: torch.Tensor, layout_on_device: bool, copy: bool = False,
           pin: bool = False) -> tuple:
    """A packed batch -> ``(uint8 [B, 3, H, W], labels, index)``, or with ``layout_on_device``
    ``(HWCImages, labels, index)`` for the device to finish (:func:`~facemargin.data.loading.layout.to_training_layout`).

    ``copy``: the images are copied into a fresh buffer (pinned when ``pin``); labels and indices
    never keep ``buffer`` alive.
    """
    pixels, labels, index, flip = layout.views(buffer)
    if not layout_on_device:
        return to_training_layout(HWCImages(pixels, flip)), labels.clone(), index.clone()
    if copy:
        own = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        own.copy_(buffer)
        pixels, _, _, flip = layout.views(own)
    return HWCImages(pixels, flip), labels.clone(), index.clone()
