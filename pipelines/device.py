"""The one device helper and the one seed helper."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch


def pick_device(choice: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU (with a one-line notice); 'cuda' without CUDA
    falls back to CPU with the same notice rather than crashing a scheduled run."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        print("notice: CUDA requested but not available; training on CPU", file=sys.stderr)
    return torch.device("cpu")


def cpu_threads(*, processes: int = 1) -> int:
    """CPU threads for one of `processes` processes sharing this machine: the cores this process
    may run on (its affinity mask: a container's or `taskset`'s share, not the host's count),
    split evenly, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; on CPU the same seed and data give identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
