"""Weight transfer to vLLM servers: the `gloo` backend of vLLM's weight-transfer API, both sides.

vLLM's server applies weight updates through its RL endpoints (`/init_weight_transfer_engine`,
`/start_weight_update`, `/update_weights`, `/finish_weight_update`); the bytes travel over a transport backend of
its `WeightTransferEngineFactory`. vLLM ships NCCL and CUDA-IPC backends (GPUs only); this module adds `gloo`, which
runs on CPU (and on any host with a TCP route to the server):

- trainer side (here), `GlooSender`: the store master and rank 0 of a gloo group with every server worker,
  broadcasting weights packed into flat byte buckets of at most `bucket_bytes` (a larger tensor is a bucket alone).
- server side (common/vllm_server_worker.py, imported by vLLM inside the server), `GlooWeightTransferEngine`:
  receives the buckets and loads them with vLLM's layerwise reload, as vLLM's own NCCL engine does.

This module does not import vLLM: the trainer may not have it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

ALIGN = 16   # bytes: every tensor starts at an offset its dtype can be viewed at


@dataclass
class BucketPlan:
    """Where each tensor lies in the flat byte buckets: the JSON-safe part of one `/update_weights` request."""
    names: list[str] = field(default_factory=list)
    dtype_names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)    # per bucket: [first tensor, end tensor, bytes]
    offsets: list[int] = field(default_factory=list)           # per tensor: byte offset inside its bucket

    def to_json(self) -> dict:
        return {"names": self.names, "dtype_names": self.dtype_names, "shapes": self.shapes,
                "buckets": self.buckets, "offsets": self.offsets}


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> BucketPlan:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (0: one bucket per tensor)."""
    plan = BucketPlan()
    start, used = 0, 0
    for index, (name, tensor) in enumerate(tensors):
        size = _aligned(tensor.numel() * tensor.element_size())
        if index > start and (bucket_bytes <= 0 or used + size > bucket_bytes):
            plan.buckets.append([start, index, used])
            start, used = index, 0
        plan.names.append(name)
        plan.dtype_names.append(str(tensor.dtype).removeprefix("torch."))
        plan.shapes.append(list(tensor.shape))
        plan.offsets.append(used)
        used += size
    if tensors:
        plan.buckets.append([start, len(tensors), used])
    return plan


def pack_bucket(tensors: list[tuple[str, torch.Tensor]], plan: BucketPlan, bucket: int) -> torch.Tensor:
    first, end, size = plan.buckets[bucket]
    buffer = torch.zeros(size, dtype=torch.uint8)
    for index in range(first, end):
        flat = tensors[index][1].detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        buffer[plan.offsets[index]: plan.offsets[index] + flat.numel()] = flat
    return buffer


def unpack_bucket(buffer: torch.Tensor, plan: dict, bucket: int) -> list[tuple[str, torch.Tensor]]:
    first, end, _ = plan["buckets"][bucket]
    out = []
    for index in range(first, end):
        dtype = getattr(torch, plan["dtype_names"][index])
        shape = plan["shapes"][index]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        offset = plan["offsets"][index]
        out.append((plan["names"][index], buffer[offset: offset + nbytes].view(dtype).view(shape)))
    return out


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> tuple:
    """A gloo process group outside torch.distributed's default one (vLLM's workers already hold theirs)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    group = dist.ProcessGroupGloo(dist.PrefixStore("weights", store), rank, world_size, timeout)
    return store, group


def broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------------------------------------------------
class GlooSender:
    """Rank 0 of the weight group: `world_size` = 1 + every server worker; servers join at init."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> None:
        self.host, self.port, self.world_size, self.timeout_s = host, port, world_size, timeout_s
        self.store = self.group = None

    def connect(self) -> None:
        # blocks until every server worker has joined: call it while their init requests are in flight
        self.store, self.group = gloo_group(self.host, self.port, 0, self.world_size, self.timeout_s)

    def send(self, tensors: list[tuple[str, torch.Tensor]], plan: BucketPlan, buckets: Optional[Iterable[int]] = None
             ) -> int:
        """Broadcast the planned buckets (all by default); returns the bytes sent."""
        sent = 0
        for bucket in (range(len(plan.buckets)) if buckets is None else buckets):
            buffer = pack_bucket(tensors, plan, bucket)
            broadcast(self.group, buffer)
            sent += buffer.numel()
        return sent

    def close(self) -> None:
        self.group = self.store = None
