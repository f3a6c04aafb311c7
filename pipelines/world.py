"""The torchrun world: which process this is (global rank, node, rank on the node), its device
and CPU threads, and the check that every rank, on every node, trains on the same thing.

torchrun sets RANK / WORLD_SIZE (all nodes together), LOCAL_RANK / LOCAL_WORLD_SIZE (this node)
and GROUP_RANK / GROUP_WORLD_SIZE (this node's index / the node count). Without them the process
is rank 0 of 1 and no process group is made.

    w = world.init("auto")                       # gloo on CPU, NCCL on CUDA (one GPU per rank)
    world.agree(w, world.facts(params, splits, ...), problem=None)
    ...                                          # only w.rank == 0 writes outputs
    world.close(w)

On one machine every rank reads the same files. Across machines each node reads its own copy of
the data and of params.yaml: a node with a stale `data/prepared` would train on other rows under
the same indices, silently. `agree` compares a digest of each across all ranks first.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines import packed
from pipelines.device import cpu_threads, pick_device
from pipelines.files import sha256_file
from pipelines.settings import Params

REPORT_BYTES = 4096   # one rank's report in `agree` (JSON: host, digests or one problem line)
PROBLEM_CHARS = 1500  # a problem line is cut to this, so that a report always fits


class WorldError(RuntimeError):
    """The ranks do not agree, or one cannot train; the message names the node, host and rank."""


@dataclass(frozen=True)
class World:
    device: torch.device
    rank: int          # global, 0 .. size-1; only rank 0 writes outputs
    size: int          # processes on all nodes together (the DDP world)
    local_rank: int    # on this node: picks the GPU
    local_size: int    # processes on this node: they share its CPU cores
    node: int          # this node's index, 0 .. nodes-1
    nodes: int
    host: str          # for messages: which machine a problem is on


def _env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def init(choice: str = "auto") -> World:
    """This process's place in the world, its device and threads; the process group when there
    is more than one process (torchrun's MASTER_ADDR/PORT, from the rendezvous)."""
    size = _env("WORLD_SIZE", 1)
    local_size = _env("LOCAL_WORLD_SIZE", size)
    host = socket.gethostname()[:255]
    device = pick_device(choice)
    if size == 1:
        torch.set_num_threads(cpu_threads())  # CPU: use every core
        return World(device, 0, 1, 0, 1, 0, 1, host)
    local_rank = _env("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        # The cores of THIS node are split among ITS processes: dividing by the whole world
        # (2 nodes x 1 process) left each node's one process half its cores.
        torch.set_num_threads(cpu_threads(processes=local_size))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(device, dist.get_rank(), size, local_rank, local_size,
                 _env("GROUP_RANK", 0), _env("GROUP_WORLD_SIZE", max(1, size // local_size)),
                 host)


def close(w: World) -> None:
    if w.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def digest(*parts: bytes | str) -> str:
    """sha256 over length-prefixed parts (so that ("ab", "c") != ("a", "bc"))."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# What every node must have alike for a multi-node run, and how to get there (README "Scaling
# out"): one commit and params.yaml, one install, and the prepared data from the DVC remote.
REMEDY = ("run every node from the same git commit and params.yaml, with the same labelgate "
          "and torch, the same production model to warm-start from, and the same data: "
          "`dvc push prepare` on node 0, `dvc pull prepare` on the others (`dvc status "
          "prepare` shows what differs)")


def facts(params: Params, splits: dict[str, packed.Split], *, init_model: Path | None,
          init_model_sha256: str | None) -> dict[str, str]:
    """What this rank will train on, as digests the ranks compare (world.agree): the sections
    the train stage reads, the software, the warm-start model, and each split's rows (image
    sha256s, labels, task ids, shape and input spec; not the pixels, which are a function of
    those and would cost a read of the whole split). A node without the production model
    would train from scratch under another recipe than node 0 (DDP copies rank 0's weights,
    not its optimizer's parameter groups)."""
    try:
        version = importlib.metadata.version("labelgate")
    except importlib.metadata.PackageNotFoundError:  # a checkout run with `python -m`
        version = "not installed"
    found = {"params (base, input, train)": digest(repr((params.base, params.input,
                                                         params.train))),
             "labelgate and torch versions": digest(version, torch.__version__)}
    if params.train.init == "production":
        start = init_model_sha256 or (sha256_file(init_model) if init_model is not None
                                      and Path(init_model).is_file() else str(init_model))
        found["production model to warm-start from"] = digest(start)
    for name, s in splits.items():
        found[f"{name} split"] = digest(
            json.dumps(s.spec.to_json(), sort_keys=True), repr(s.x.shape), s.y.tobytes(),
            s.task_id.tobytes(), "\n".join(s.sha256.tolist()))
    return found


def _exchange(w: World, report: dict) -> list[dict]:
    """Every rank's `report`, in rank order, on every rank. Fixed-size JSON bytes in a uint8
    tensor (all_gather; NCCL needs it on the GPU): no pickle between machines."""
    data = json.dumps(report, sort_keys=True).encode()
    if len(data) > REPORT_BYTES:  # digests are 64 hex; only an absurd problem line gets here
        data = json.dumps({**report, "problem": "report too long", "facts": None}).encode()
    buf = torch.zeros(REPORT_BYTES, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(w.device)
    gathered = [torch.empty_like(buf) for _ in range(w.size)]
    dist.all_gather(gathered, buf)
    return [json.loads(bytes(t.cpu().numpy()).rstrip(b"\0")) for t in gathered]


def agree(w: World, facts: Mapping[str, str] | None, *, problem: str | None = None,
          remedy: str = REMEDY) -> list[str]:
    """Collective: every rank calls it. `facts` name -> digest (what this rank will train on),
    or `problem`: why this rank cannot train (then `facts` is None). Returns when every rank has
    the same facts (then: every rank's host, by rank); else raises the same WorldError on every
    rank, naming the first node that differs from rank 0 (or cannot train) and `remedy`. One
    process: only `problem` matters."""
    if w.size == 1:
        if problem:
            raise WorldError(problem)
        return [w.host]
    reports = _exchange(w, {"rank": w.rank, "node": w.node, "host": w.host,
                            "facts": None if problem else dict(facts or {}),
                            "problem": problem[:PROBLEM_CHARS] if problem else None})

    def where(r: dict) -> str:
        return f"node {r['node']} (host {r['host']}, rank {r['rank']})"

    for r in reports:
        if r["problem"]:
            raise WorldError(f"{where(r)} cannot train: {r['problem']}; {remedy}")
    first = reports[0]
    for r in reports[1:]:
        differ = [name for name in first["facts"] if r["facts"].get(name) != first["facts"][name]]
        differ += [name for name in r["facts"] if name not in first["facts"]]
        if differ:
            raise WorldError(f"{where(r)} has another {' and another '.join(differ)} than "
                             f"{where(first)}: every rank must train on the same data with the "
                             f"same settings; {remedy}")
    return [r["host"] for r in reports]
