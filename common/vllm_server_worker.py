"""Inside a vLLM server: the `gloo` weight-transfer backend, registered in vLLM's `WeightTransferEngineFactory`.

Start the server with
    PYTHONPATH=<this repo> VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model M \\
        --worker-extension-cls common.vllm_server_worker.GlooWeightTransferExtension \\
        --weight-transfer-config '{"backend": "gloo"}' --enable-scale-out --logprobs-mode processed_logprobs
vLLM imports the extension's module in each worker process before it creates the transfer engine, so importing
this module is what registers the backend. The trainer side is common/vllm_weight_transfer.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from common.vllm_weight_transfer import broadcast, gloo_group, unpack_bucket


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int    # this server's first rank in the group (the trainer is 0)
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list
    dtype_names: list
    shapes: list
    buckets: list                         # per bucket: [first tensor, end tensor, bytes]
    offsets: list                         # per tensor: byte offset in its bucket
    only_buckets: Optional[list] = None   # receive only these buckets (one request per bucket)


class GlooWeightTransferEngine(WeightTransferEngine):
    """Receives broadcast byte buckets from the trainer (rank 0) and loads them through vLLM's layerwise reload
    (`start_weight_update` .. `finish_weight_update`), as vLLM's NCCL engine does on GPUs."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = self.store = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + self.parallel_config.rank
        self.store, self.group = gloo_group(init_info.master_address, init_info.master_port, rank,
                                            init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))   # synchronous: no device sync needed on CPU

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: /init_weight_transfer_engine was not called")
        plan = {"names": update_info.names, "dtype_names": update_info.dtype_names, "shapes": update_info.shapes,
                "buckets": update_info.buckets, "offsets": update_info.offsets}
        buckets = update_info.only_buckets if update_info.only_buckets is not None \
            else range(len(update_info.buckets))
        for bucket in buckets:
            buffer = torch.empty(update_info.buckets[bucket][2], dtype=torch.uint8)
            broadcast(self.group, buffer)
            # copies: the layerwise reload may keep a tensor until its layer is complete
            self.model.load_weights([(name, tensor.to(self.device, copy=True))
                                     for name, tensor in unpack_bucket(buffer, plan, bucket)])

    def shutdown(self) -> None:
        self.group = self.store = None


if "gloo" not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)


class GlooWeightTransferExtension:
    """The server's `--worker-extension-cls`: its import registers the gloo backend in the worker process."""

    def weight_transfer_backend(self) -> str:
        return type(self.weight_transfer_engine).__name__
