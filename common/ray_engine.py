"""The `ray` rollout backend: the in-process vLLM engine (common/vllm_engine.py's `VLLMEngine`) inside a Ray actor.

- `ray.init` joins the cluster that `RAY_ADDRESS` names (a SLURM / cluster job: `ray start --head` on one node,
  `ray start --address ...` on the others), else starts a local one. Process 0 creates the actor (a named actor in
  the `teacher-training` namespace) and tells the other training processes its name and the cluster's address;
  all of them then sample through the one actor, each its own prompts.
- After every optimizer step every process walks the weights with the vllm backend's packer (`hf_weights`: ZeRO-3
  gathers in capped groups, PEFT merged, tied heads named) and process 0 puts them into Ray's object store in
  buckets of at most `bucket_bytes`; the actor reads them one bucket at a time into vLLM's `reload_weights` and
  answers with the version it then holds. Every rollout carries the actor's version; one that differs from the
  trainer's is an error (a stale engine), as is an actor that died (`RayEngineError`, naming the actor).
- `tensor_parallel_size > 1` runs vLLM's Ray executor inside the actor (`distributed_executor_backend="ray"`,
  one GPU per worker from a placement group). vLLM refuses that executor on CPU; the refusal comes back as one
  error at engine start.

Ray is imported here only, and only when an engine is built.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import Optional, Sequence

import torch

from common.rollout import Rollout, SamplingParams
from common.vllm_server import ServerError

logger = logging.getLogger(__name__)
NAMESPACE = "teacher-training"
INSTALL_HINT = ("use_ray=true needs Ray: `pip install ray==2.60.0` (requirements-dev.txt pins it); or set "
                "use_ray=false to run vLLM in the training processes")


class RayEngineError(ServerError):
    """The engine's Ray actor died, is unreachable, failed a call, or holds other weights than the trainer's."""


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return ray


class EngineActor:
    """Lives in the Ray actor: one `VLLMEngine` (no accelerator: the actor is not a training process)."""

    def __init__(self, model_path: str, tokenizer, options: dict, own_devices: bool) -> None:
        self.ray_executor = options.get("distributed_executor_backend") == "ray"
        if own_devices:   # vLLM's Ray executor places its workers itself, one GPU each
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        from common.vllm_engine import VLLMEngine
        self.engine = VLLMEngine(model_path, tokenizer, **options)

    def weights_version(self) -> int:
        return self.engine.weights_version

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Rollout]:
        return self.engine.generate(prompt_ids, params)

    def load_weights(self, buckets: list, version: int) -> int:
        """`buckets`: object refs, each to a list of (name, tensor); fetched one at a time while vLLM loads."""
        import ray

        def weights():
            for ref in buckets:
                yield from ray.get(ref)

        # the Ray executor's workers are other processes: they get the tensors, not a generator
        stream = list(weights()) if self.ray_executor else weights()
        return self.engine.load_weights(stream, version)

    def close(self) -> None:
        self.engine.close()


def connect(ray) -> str:
    """Join the cluster `RAY_ADDRESS` names, else start a local one; returns the cluster's address."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True)
        except ConnectionError as err:   # a wrong RAY_ADDRESS: bad input, before any model loads
            raise ValueError(f"use_ray: cannot join the Ray cluster at RAY_ADDRESS={address}: {err}") from None
        logger.info("Ray: %s", f"joined the cluster at {address}" if address else "started a local cluster")
    return ray.get_runtime_context().gcs_address


class RayEngine:
    """Rollouts from a `VLLMEngine` in a Ray actor, shared by every training process; the policy's engine is
    weight-synced, a frozen sampler's (`sync=False`) never.

    `options`: `VLLMEngine` keywords (`vllm_options(cfg)`); `tensor_parallel_size` is the actor's engine's (vLLM's
    Ray executor when > 1). `bucket_bytes` caps one object-store bucket of the weight push, `sync_group_bytes` one
    ZeRO-3 gather. With a seed, process k samples with seed + 1000003 k.
    """

    def __init__(self, model_path: str, tokenizer, accelerator=None, *, sync: bool = True,
                 tensor_parallel_size: int = 1, bucket_bytes: int = 256 * 2 ** 20,
                 sync_group_bytes: int = 256 * 2 ** 20, startup_timeout_s: float = 1800.0,
                 stop_token_ids: Optional[Sequence[int]] = None, name: Optional[str] = None, **options) -> None:
        ray = import_ray()
        if stop_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("RayEngine: the tokenizer has no eos token; set tokenizer.eos_token or pass "
                                 "stop_token_ids")
            stop_token_ids = [tokenizer.eos_token_id]
        if tensor_parallel_size < 1:
            raise ValueError(f"ray_tensor_parallelism={tensor_parallel_size}: expected an integer >= 1")
        options.pop("device", None)   # the actor's engine runs on the devices Ray gives it
        self.tokenizer, self.accelerator = tokenizer, accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.sync, self.bucket_bytes, self.sync_group_bytes = sync, bucket_bytes, sync_group_bytes
        self.weights_version = 0
        self.last_sync: dict = {}
        self.actor = None
        self.name = name or f"vllm-{'policy' if sync else 'sampler'}-{uuid.uuid4().hex[:8]}"

        found: list = [(None, self.name, False, "")]   # process 0's: (cluster address, actor, bad input, error)
        if self.rank == 0:
            try:
                address = connect(ray)
                self.actor = self._start(ray, model_path, tokenizer, tensor_parallel_size, stop_token_ids, options,
                                         startup_timeout_s)
                found = [(address, self.name, False, "")]
            except Exception as err:   # told to the other processes before any of them raises
                failure = err
                found = [(None, self.name, isinstance(err, ValueError), str(err))]
        if self.world > 1:   # the other processes join the cluster process 0 is on and look the actor up
            import torch.distributed as dist
            dist.broadcast_object_list(found, src=0)
        address, self.name, bad_input, message = found[0]
        if address is None:
            if self.rank == 0:
                raise failure
            raise (ValueError if bad_input else RayEngineError)(message)
        if self.rank > 0:
            if not ray.is_initialized():
                ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
            self.actor = ray.get_actor(self.name, namespace=NAMESPACE)

    def _start(self, ray, model_path, tokenizer, tensor_parallel_size, stop_token_ids, options, timeout_s):
        started = time.time()
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        resources: dict = {"num_cpus": 1, "num_gpus": 1 if gpus else 0}
        own_devices = gpus and tensor_parallel_size > 1
        if own_devices:   # the executor's workers take one GPU each from a group the actor reserves
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            group = placement_group([{"GPU": 1, "CPU": 1}] * tensor_parallel_size)
            ray.get(group.ready(), timeout=timeout_s)
            resources = {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_capture_child_tasks=True, placement_group_bundle_index=0)}
        engine_options = {**options, "tensor_parallel_size": tensor_parallel_size, "stop_token_ids": stop_token_ids}
        if tensor_parallel_size > 1:
            engine_options["distributed_executor_backend"] = "ray"
        actor = ray.remote(EngineActor).options(name=self.name, namespace=NAMESPACE, max_restarts=0,
                                                **resources).remote(model_path, tokenizer, engine_options,
                                                                    own_devices)
        try:
            ray.get(actor.weights_version.remote(), timeout=timeout_s)
        except ray.exceptions.RayError as err:
            raise ValueError(f"use_ray: the vLLM engine in Ray actor {self.name!r} did not start "
                             f"(ray_tensor_parallelism={tensor_parallel_size}): {_cause(err)}") from None
        logger.info("vLLM engine for %s in Ray actor %r up in %.1f s (tensor parallel %d%s)", model_path, self.name,
                    time.time() - started, tensor_parallel_size, ", Ray executor" if tensor_parallel_size > 1 else "")
        return actor

    # ----- calls to the actor -------------------------------------------------------------------------------------
    def _call(self, what: str, ref):
        import ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as err:
            raise RayEngineError(f"Ray actor {self.name!r} (vLLM engine): {what} failed: {_cause(err)}") from None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("RayEngine.generate: empty prompt (no tokens) at index "
                             f"{next(i for i, p in enumerate(prompt_ids) if len(p) == 0)}")
        if params.seed is not None:   # processes sharing the actor must not draw the same samples
            params = dataclasses.replace(params, seed=params.seed + 1_000_003 * self.rank)
        rollouts = self._call("generate", self.actor.generate.remote([list(p) for p in prompt_ids], params))
        if self.sync:
            held = {r.weights_version for r in rollouts}
            if held - {self.weights_version}:
                raise RayEngineError(f"Ray actor {self.name!r} (vLLM engine) sampled with weight version(s) "
                                     f"{sorted(held)}, expected {self.weights_version} (a stale engine)")
        return rollouts

    def sync_weights(self, model: torch.nn.Module, version: Optional[int] = None) -> int:
        """Push `model`'s weights to the actor under `version` (default: previous + 1); returns it."""
        import ray

        from common.vllm_engine import hf_weights
        if not self.sync:
            raise RuntimeError("RayEngine: a frozen sampler's engine is never weight-synced")
        version = self.weights_version + 1 if version is None else version
        started = time.time()
        stats = {"groups": 0, "tensors": 0, "bytes": 0}
        weights = hf_weights(model, self.accelerator, self.sync_group_bytes, stats)
        failure: Optional[RayEngineError] = None
        buckets = 0
        if self.rank == 0:
            refs, bucket, size = [], [], 0
            for name, tensor in weights:   # walked in full (ZeRO-3 gathers are collective); put() copies
                bucket.append((name, tensor.detach().to("cpu")))
                size += tensor.numel() * tensor.element_size()
                if size >= self.bucket_bytes:
                    refs.append(ray.put(bucket))
                    bucket, size = [], 0
            if bucket:
                refs.append(ray.put(bucket))
            buckets = len(refs)
            try:
                held = self._call("weight sync", self.actor.load_weights.remote(refs, version))
                if held != version:
                    raise RayEngineError(f"Ray actor {self.name!r} (vLLM engine) holds weight version {held} after "
                                         f"the sync to {version} (a stale engine)")
            except RayEngineError as err:
                failure = err
            del refs
        else:
            for _ in weights:   # join the collective gathers
                pass
        if self.world > 1:   # no process samples before the actor holds the new weights; a failure stops all
            flag = torch.tensor([float(failure is not None)], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="max").item() > 0 and failure is None:
                failure = RayEngineError(f"Ray actor {self.name!r} (vLLM engine): the weight sync failed on "
                                         f"process 0")
        if failure is not None:
            raise failure
        seconds = time.time() - started
        self.weights_version = version
        self.last_sync = {**stats, "buckets": buckets, "seconds": seconds,
                          "gb_per_s": stats["bytes"] / max(seconds, 1e-9) / 1e9}
        if self.rank == 0:
            logger.info("weight sync %d to Ray actor %r: %d buckets, %.1f MB, %.2f s, %.3f GB/s", version, self.name,
                        buckets, stats["bytes"] / 1e6, seconds, self.last_sync["gb_per_s"])
        return version

    def sync_metrics(self) -> dict:
        """The last sync's figures, for the step's metrics row."""
        return {"sync/buckets": float(self.last_sync.get("buckets", 0)),
                "sync/megabytes": self.last_sync.get("bytes", 0) / 1e6,
                "sync/gb_per_s": self.last_sync.get("gb_per_s", 0.0)}

    def close(self) -> None:
        """Process 0 shuts the engine down and ends the actor (the others only drop their handle)."""
        if self.actor is None:
            return
        import ray
        actor, self.actor = self.actor, None
        if self.rank == 0:
            try:
                ray.get(actor.close.remote(), timeout=120)
            except ray.exceptions.RayError as err:
                logger.warning("Ray actor %r: close failed (%s)", self.name, _cause(err))
            ray.kill(actor)


def _cause(err: Exception) -> str:
    """The root of a Ray error in one line: the creation or method task's own exception where there is one."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    raised = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (raised[-1] if raised else lines[-1] if lines else type(err).__name__)[:1000]


def check_ray_config(cfg) -> None:
    """use_ray=true, checked before any model loads: Ray importable, the vLLM engine (use_vllm) is what goes into
    the actor, not a server, and the in-process keys that cannot apply to an actor are at their defaults."""
    import importlib.util

    from common.config import ConfigError
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"key 'use_ray' = true: {INSTALL_HINT}")
    if cfg.use_vllm_server:
        raise ConfigError("use_ray=true with use_vllm_server=true: a vLLM server runs where it was started; use_ray "
                          "runs the vLLM engine in a Ray actor. Set one of them to false")
    if not cfg.use_vllm:
        raise ConfigError("use_ray=true runs the vLLM engine (use_vllm=true) in a Ray actor; set use_vllm=true")
    if cfg.vllm_tensor_parallel_size != 1:
        raise ConfigError(f"key 'vllm_tensor_parallel_size' = {cfg.vllm_tensor_parallel_size} with use_ray=true: the "
                          f"actor's engine is split by ray_tensor_parallelism; set vllm_tensor_parallel_size=1")
    if cfg.vllm_device != "auto":
        raise ConfigError(f"key 'vllm_device' = {cfg.vllm_device!r} with use_ray=true: the actor's engine runs on "
                          f"the devices Ray gives it; set vllm_device=auto")


def ray_options(cfg, tokenizer, accelerator, use_bf16: bool = False) -> dict:
    """The policy's RayEngine keywords from a script config."""
    from common.rollout import vllm_options
    return {**vllm_options(cfg, use_bf16), "model_path": cfg.model_name_or_path, "tokenizer": tokenizer,
            "accelerator": accelerator, "sync": True, "tensor_parallel_size": cfg.ray_tensor_parallelism,
            "bucket_bytes": int(cfg.vllm_sync_bucket_mb * 2 ** 20)}
