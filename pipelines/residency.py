"""Where a split's pixels live while training: on the device, or streamed from its memory map.

A split that fits `train.resident_max_mb` is copied to the device once as uint8 (CIFAR-10's
50,000 32x32 RGB images: 154 MB) and a batch is an index into it. A bigger one stays a
memory-mapped `(N, H, W, C)` uint8 file (pipelines/packed.py); a background thread gathers each
batch's rows into a pinned host buffer while the device works on the previous batch, and the
copy to the device is asynchronous. Both paths see the same rows in the same order
(`epoch_batches`), so with the same generator they give the same model, bit for bit on CPU.
Labels (8 B per image) are always on the device. Nothing is decoded here: the split holds pixels
at the training resolution.

    src = residency.source(split.x, split.y, device=dev, resident=True)
    for xb, yb in src.batches(residency.epoch_batches(len(src), 256, gen)): ...
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

PREFETCH = 2   # batches read ahead; the ring holds PREFETCH + 2 pinned buffers (one being
               # filled, PREFETCH waiting, one being copied to the device)


@dataclass(frozen=True)
class Placement:
    resident: bool
    split_mb: float       # uint8 pixels of the splits asked about, MB
    budget_mb: float
    note: str             # one line for the log: what was decided and why


def place(nbytes: int, budget_mb: float) -> Placement:
    """Resident when the pixels (`nbytes`, all splits that go to the device together) fit."""
    mb = nbytes / 2**20
    resident = mb <= budget_mb
    verb = "on the device" if resident else "streamed from disk (memory-mapped, prefetched)"
    return Placement(resident, mb, budget_mb,
                     f"{mb:,.1f} MB of pixels {verb}: train.resident_max_mb is {budget_mb:g}")


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches: a fresh permutation (drawn on the CPU, so every path and device gets
    the same one from the same seed) cut into `batch_size` pieces, each sorted (reads from a
    memory map walk forward through the file; a batch's order does not change its gradient)."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size].sort().values for i in range(0, n, batch_size)]


def in_order(n: int, batch_size: int) -> list[torch.Tensor]:
    """Batches of 0..n-1 in order (evaluation)."""
    return [torch.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


class Resident:
    """The whole split on the device as uint8; a batch is one gather there."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, device: torch.device) -> None:
        # np.array copies a memory map into memory once (the only read of the file; on the CPU
        # it is then the resident copy, not page cache that may be evicted)
        self.x = torch.from_numpy(np.array(x)).to(device)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, index: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in index:
            idx = idx.to(self.device, non_blocking=True)
            yield self.x[idx], self.y[idx]


class Streamed:
    """Rows gathered from a memory-mapped `(N, H, W, C)` uint8 array by a background thread,
    `PREFETCH` batches ahead; on CUDA through pinned buffers and non_blocking copies (a buffer
    is refilled only after the event recorded behind its copy has completed)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, device: torch.device) -> None:
        self.x = x
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        self.device = device
        self.cuda = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, index: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not index:
            return
        width = max(len(i) for i in index)
        ring = [None] * (PREFETCH + 2)
        events: list[torch.cuda.Event | None] = [None] * len(ring)
        if self.cuda:
            ring = [torch.empty((width, *self.x.shape[1:]), dtype=torch.uint8).pin_memory()
                    for _ in ring]
        ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()

        def produce() -> None:
            try:
                for k, idx in enumerate(index):
                    rows = idx.numpy()
                    if self.cuda:
                        slot = k % len(ring)
                        if events[slot] is not None:
                            events[slot].synchronize()   # its last copy to the device is done
                        host = ring[slot][:len(rows)]
                        np.take(self.x, rows, axis=0, out=host.numpy())
                    else:
                        # CPU: the "device" tensor is the host array, so a fresh one per batch
                        host = torch.from_numpy(np.take(self.x, rows, axis=0))
                    while not stop.is_set():
                        try:
                            ready.put((k, host), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put((None, None))
            except BaseException as exc:  # handed to the consumer, re-raised there
                ready.put((None, exc))

        thread = threading.Thread(target=produce, name="labelgate-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                k, host = ready.get()
                if k is None:
                    if isinstance(host, BaseException):
                        raise host
                    return
                xb = host.to(self.device, non_blocking=True)
                if self.cuda:
                    ev = torch.cuda.Event()
                    ev.record()
                    events[k % len(ring)] = ev
                yield xb, self.y[index[k].to(self.device, non_blocking=True)]
        finally:
            stop.set()
            while thread.is_alive():      # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.1)


def source(x: np.ndarray, y: np.ndarray, *, device: torch.device,
           resident: bool) -> Resident | Streamed:
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return Resident(x, y, device=device) if resident else Streamed(x, y, device=device)
