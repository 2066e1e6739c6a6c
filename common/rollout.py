"""One generation interface for rollouts (GRPO, GKD on-policy samples).

An engine takes prompt token ids and `SamplingParams` and returns `Rollout`s, ordered prompt-major:
all `num_generations` samples of prompt 0, then those of prompt 1, and so on.

Backends (`make_engine(kind)`):
  hf      transformers `generate` on the training model itself (`HFGenerateEngine`, below)
  vllm    vLLM's `LLM` in the training processes (`common.vllm_engine.VLLMEngine`, imported only when chosen)
  server  vLLM's own OpenAI-compatible server over HTTP, weights pushed through its RL endpoints
          (`common.vllm_server.VLLMServerEngine`)
  ray     the vllm backend's engine inside a Ray actor shared by the training processes, weights pushed
          through Ray's object store (`common.ray_engine.RayEngine`)

An engine is either the policy's (synced after every optimizer step: `sync_weights`) or a frozen sampler built
from a model path and never synced (the teacher-GRPO student, GKD's teacher with seq_kd); the backend of each
is a config choice. Every rollout carries the weights version it was sampled with.

Each rollout carries the log-probability of every sampled token under the distribution it was drawn
from (after repetition penalty, temperature, top-k, top-p, min-p), so a trainer can compare it with
its own forward pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Protocol, Sequence

import torch

from common.logprobs import cache_argument, repeat_cache_rows, returned_cache
from common.models import eval_mode

FinishReason = Literal["stop", "length"]
ENGINE_KINDS = ("hf", "vllm", "server", "ray")


# ---------------------------------------------------------------------------------------------
# Data passed between modules
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `None` disables top_k / min_p; temperature 0 means greedy decoding."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    max_new_tokens: int = 16384
    num_generations: int = 1
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ValueError(f"SamplingParams.{key}={getattr(self, key)!r}: expected {expected}")

        if not self.temperature >= 0:
            fail("temperature", "a number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            fail("top_k", "null (disabled) or an integer >= 1")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            fail("min_p", "null (disabled) or a number in [0, 1]")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "a number > 0 (1.0 = off)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1")
        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            fail("num_generations", "an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One sampled completion of one prompt."""
    prompt_ids: list[int]
    completion_ids: list[int]          # ends with the stop token when finish_reason == "stop"
    logprobs: Optional[list[float]]    # per completion token, under the sampling distribution; None if the engine has none
    finish_reason: FinishReason        # "stop": a stop token was sampled; "length": max_new_tokens reached
    prompt_index: int                  # index into the prompt list given to generate()
    generation_index: int              # 0 .. num_generations - 1
    completion_text: Optional[str] = None  # decoded completion, special tokens removed
    weights_version: int = 0               # the engine's weights when sampled (the policy's: the optimizer step)


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Return len(prompt_ids) * params.num_generations rollouts, prompt-major."""
        ...

    def sync_weights(self, model: torch.nn.Module, version: Optional[int] = None) -> int:
        """Make the next generate() sample from `model`'s current weights, tagged `version` (default: the
        previous version + 1); returns the version."""
        ...

    def close(self) -> None:
        """Free the engine (after the run's last collective)."""
        ...


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------
def truncate_prompts(prompt_ids: Sequence[Sequence[int]], max_prompt_length: Optional[int], side: str = "left",
                     on_overflow: str = "truncate") -> tuple[list[list[int]], int]:
    """Cut prompts to `max_prompt_length` tokens; return (prompts, how many were cut).

    side="left" drops the oldest tokens and keeps the end (the question and the assistant header
    that generation continues from); side="right" keeps the start.
    on_overflow="error" raises instead of cutting.
    """
    if side not in ("left", "right"):
        raise ValueError(f"truncate_prompts: side={side!r}, expected 'left' or 'right'")
    if on_overflow not in ("truncate", "error"):
        raise ValueError(f"truncate_prompts: on_overflow={on_overflow!r}, expected 'truncate' or 'error'")
    prompts = [list(p) for p in prompt_ids]
    if max_prompt_length is None:
        return prompts, 0
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length}: expected null or an integer >= 1")
    too_long = [len(p) for p in prompts if len(p) > max_prompt_length]
    if not too_long:
        return prompts, 0
    if on_overflow == "error":
        raise ValueError(
            f"{len(too_long)} prompt(s) exceed max_prompt_length={max_prompt_length}; the longest has "
            f"{max(too_long)} tokens. Raise max_prompt_length or allow truncation.")
    if side == "left":
        prompts = [p[-max_prompt_length:] for p in prompts]
    else:
        prompts = [p[:max_prompt_length] for p in prompts]
    return prompts, len(too_long)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts right-aligned so every row continues at the same position."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)          # [B, T]
    for row, prompt in enumerate(prompt_ids):
        if len(prompt):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_stop(new_tokens: Sequence[int], stop_token_ids: Sequence[int]) -> tuple[int, FinishReason]:
    """Length of the completion (through the first stop token, which is kept) and why it ended."""
    stops = set(stop_token_ids)
    for position, token in enumerate(new_tokens):
        if token in stops:
            return position + 1, "stop"
    return len(new_tokens), "length"


class _SampledTokenLogprobs:
    """Last logits processor of a generate() call: records log p(sampled token) under the final scores.

    A processor sees only the tokens chosen before the current step, so each call scores the
    previous step's choice; `finish` scores the last one. Memory stays O(rows x vocab) instead of
    the O(steps x rows x vocab) that output_scores=True would keep.
    """

    def __init__(self) -> None:
        self.previous_logprobs: Optional[torch.Tensor] = None  # [R, V]
        self.chosen: list[torch.Tensor] = []                   # each [R]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous_logprobs is not None:
            last_token = input_ids[:, -1:]                                                    # [R, 1]
            self.chosen.append(self.previous_logprobs.gather(1, last_token).squeeze(1))       # [R]
        self.previous_logprobs = torch.log_softmax(scores.float(), dim=-1)                    # [R, V]
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs of `new_tokens` [R, N] (the returned generation), as [R, N]."""
        num_new = new_tokens.shape[1]
        if len(self.chosen) < num_new:  # the last step's choice has not been scored yet
            self.chosen.append(self.previous_logprobs.gather(1, new_tokens[:, -1:]).squeeze(1))
        if len(self.chosen) < num_new:
            raise RuntimeError(f"recorded {len(self.chosen)} sampling steps for {num_new} generated tokens")
        return torch.stack(self.chosen[:num_new], dim=1)                                      # [R, N]


def _sampling_processors(params: SamplingParams) -> tuple[list, _SampledTokenLogprobs]:
    """The sampling warpers, in transformers' own order, followed by the log-prob recorder.

    They are passed to generate() explicitly (with transformers' own warpers switched off) so the
    recorder runs after all of them and sees exactly the distribution tokens are drawn from.
    """
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if not params.greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k is not None:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=params.min_p))
    recorder = _SampledTokenLogprobs()
    processors.append(recorder)
    return processors, recorder


# ---------------------------------------------------------------------------------------------
# transformers backend
# ---------------------------------------------------------------------------------------------
class HFGenerateEngine:
    """Rollouts from `model.generate` on the training model.

    `model` may be the object returned by `accelerator.prepare` (DDP or DeepSpeed engine). Under
    DeepSpeed ZeRO-3 the full weights are gathered on every process for the duration of a
    generate() call, so every process must call generate() together (once per step), with any
    number of prompts. `batch_size` caps the prompts per `model.generate` call (each prompt becomes
    `num_generations` rows). With `share_prompt_prefill`, each prompt is run once and its KV cache repeated
    for its rows, so generate() starts from the last prompt token (prompt compute / num_generations). `stop_token_ids` defaults to the tokenizer's EOS. With a seed, process k
    samples with seed + k.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, accelerator=None, batch_size: Optional[int] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, share_prompt_prefill: bool = True) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("HFGenerateEngine: the tokenizer has no pad token; set tokenizer.pad_token")
        if stop_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("HFGenerateEngine: the tokenizer has no eos token; set tokenizer.eos_token "
                                 "or pass stop_token_ids")
            stop_token_ids = [tokenizer.eos_token_id]
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"HFGenerateEngine: batch_size={batch_size}, expected null or an integer >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.batch_size = batch_size
        self.stop_token_ids = list(stop_token_ids)
        self.share_prompt_prefill = share_prompt_prefill
        self.weights_version = 0

    def sync_weights(self, model: torch.nn.Module, version: Optional[int] = None) -> int:
        # generate() runs on the training model itself, so its weights are always current.
        self.model = model
        self.weights_version = self.weights_version + 1 if version is None else version
        return self.weights_version

    def close(self) -> None:
        pass

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("HFGenerateEngine.generate: empty prompt (no tokens) at index "
                             f"{next(i for i, p in enumerate(prompt_ids) if len(p) == 0)}")
        batch_size = self.batch_size or max(len(prompt_ids), 1)
        rollouts: list[Rollout] = []
        seed = params.seed
        if seed is not None and self.accelerator is not None:
            seed += self.accelerator.process_index  # processes sharing a prompt must not draw the same samples
        with self._generation_mode() as model, self._seeded(seed, model):
            for start in range(0, len(prompt_ids), batch_size):
                batch = prompt_ids[start:start + batch_size]
                rollouts.extend(self._generate_batch(model, batch, start, params))
        return rollouts

    def _generate_batch(self, model, prompts: list[list[int]], first_index: int,
                        params: SamplingParams) -> list[Rollout]:
        rows = [list(p) for p in prompts for _ in range(params.num_generations)]  # prompt-major
        input_ids, attention_mask = left_pad(rows, self.tokenizer.pad_token_id, self._device(model))  # [R, T]
        processors, recorder = _sampling_processors(params)
        prefilled = self._shared_prefill(model, prompts, params.num_generations, input_ids.shape[1])
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=not params.greedy,
            # transformers' own warpers are off (and the model's generation_config defaults overridden):
            # the same warpers run inside `processors`, ahead of the log-prob recorder.
            temperature=1.0, top_k=None, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
            logits_processor=processors,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            num_beams=1,
            use_cache=True,
            synced_gpus=False,  # weights are whole on every process (ZeRO-3 gathers them), so no lockstep
            **prefilled,
        )                                                       # [R, T + N]
        new_tokens = sequences[:, input_ids.shape[1]:]          # [R, N]
        logprobs = recorder.finish(new_tokens)                  # [R, N]
        new_tokens, logprobs = new_tokens.tolist(), logprobs.tolist()

        rollouts = []
        for row, prompt in enumerate(rows):
            length, finish_reason = cut_at_stop(new_tokens[row], self.stop_token_ids)
            completion = new_tokens[row][:length]
            rollouts.append(Rollout(
                prompt_ids=prompt, completion_ids=completion, logprobs=logprobs[row][:length],
                finish_reason=finish_reason, prompt_index=first_index + row // params.num_generations,
                generation_index=row % params.num_generations,
                completion_text=self.tokenizer.decode(completion, skip_special_tokens=True),
                weights_version=self.weights_version,
            ))
        return rollouts

    def _shared_prefill(self, model, prompts: list[list[int]], group: int, width: int) -> dict:
        """{cache keyword: cache} holding all but the last token of each prompt, run once per prompt and
        repeated for its `group` rows; generate() then starts from the last prompt token. {} when off."""

        # A generation config that names a cache implementation (static, hybrid...) makes generate() build
        # its own cache and refuse one passed in.
        custom_cache = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
        cache_arg = cache_argument(model) if self.share_prompt_prefill and group > 1 and width > 1 \
            and custom_cache is None else None
        if cache_arg is None:
            return {}
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id, self._device(model))  # [U, T]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # padding positions are masked: any value
        output = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                       position_ids=position_ids[:, :-1], use_cache=True, logits_to_keep=1)
        rows = torch.arange(len(prompts), device=input_ids.device).repeat_interleave(group)     # [U * G]
        return {cache_arg: repeat_cache_rows(returned_cache(output), rows, key="share_prompt_prefix")}

    def _device(self, model) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        return next(model.parameters()).device

    def _is_zero3(self) -> bool:
        if self.accelerator is None:
            return False
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3

    @contextlib.contextmanager
    def _generation_mode(self) -> Iterator[torch.nn.Module]:
        """The plain model, whole, in eval mode under no_grad; training mode restored afterwards.

        Gradient checkpointing stays enabled: transformers only checkpoints in training mode, and
        generate() is called with use_cache=True.
        """
        with contextlib.ExitStack() as stack:
            if self._is_zero3():
                import deepspeed

                if not isinstance(self.model, deepspeed.DeepSpeedEngine):
                    raise ValueError("HFGenerateEngine under DeepSpeed ZeRO-3: pass the model returned by "
                                     f"accelerator.prepare (a DeepSpeedEngine), got {type(self.model).__name__}")
                # Gathers the partitioned weights once and removes the ZeRO-3 fetch/release hooks for
                # the duration, so each process decodes alone; hooks come back on exit.
                stack.enter_context(deepspeed.zero.unwrap_model_for_generation(self.model))
            model = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
            with eval_mode(model), torch.no_grad():
                yield model

    @staticmethod
    @contextlib.contextmanager
    def _seeded(seed: Optional[int], model) -> Iterator[None]:
        """Seed sampling without disturbing the caller's random streams."""
        if seed is None:
            yield
            return
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------
def engine_kind(use_vllm: bool, use_vllm_server: bool, use_ray: bool = False) -> str:
    """The backend the config keys `use_vllm` / `use_vllm_server` / `use_ray` ask for (use_ray: the vllm engine
    in a Ray actor; the config refuses it with use_vllm_server)."""
    if use_vllm_server:
        return "server"
    if use_ray:
        return "ray"
    return "vllm" if use_vllm else "hf"


def make_engine(kind: str, **kwargs) -> RolloutEngine:
    """Build a rollout engine.

    "hf"   -> HFGenerateEngine(model=, tokenizer=, accelerator=, ...): generate() on that model.
    "vllm" -> VLLMEngine(model_path=, tokenizer=, accelerator=, ...) (common/vllm_engine.py): an engine loaded
              from `model_path`; the policy's is then synced with sync_weights(model) after every optimizer
              step, a frozen sampler's never. `vllm_options(cfg)` turns a script config into its keywords.
    "server" -> VLLMServerEngine(servers=[(host, port)], tokenizer=, accelerator=, sync=, ...)
              (common/vllm_server.py): vLLM servers; the policy's (sync=True) gets its weights pushed after every
              optimizer step, a frozen sampler's never. `server_options(cfg, tokenizer, accelerator)` gives them.
    "ray"  -> RayEngine(model_path=, tokenizer=, accelerator=, tensor_parallel_size=, ...) (common/ray_engine.py):
              a VLLMEngine in a Ray actor; `ray_options(cfg, tokenizer, accelerator, use_bf16)` gives them.
    """
    if kind == "hf":
        return HFGenerateEngine(**kwargs)
    if kind == "vllm":
        from common.vllm_engine import VLLMEngine
        return VLLMEngine(**kwargs)
    if kind == "server":
        from common.vllm_server import VLLMServerEngine
        return VLLMServerEngine(**kwargs)
    if kind == "ray":
        from common.ray_engine import RayEngine
        return RayEngine(**kwargs)
    raise ValueError(f"unknown rollout engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")


def vllm_options(cfg, use_bf16: bool = False) -> dict:
    """The VLLMEngine keywords a script config sets (keys absent from the config keep the engine's defaults)."""
    keys = {"vllm_dtype": "dtype", "vllm_gpu_memory_utilization": "gpu_memory_utilization",
            "vllm_max_model_len": "max_model_len", "enable_prefix_caching": "enable_prefix_caching",
            "enforce_eager": "enforce_eager", "vllm_tensor_parallel_size": "tensor_parallel_size",
            "vllm_enable_sleep_mode": "enable_sleep_mode", "vllm_device": "device", "seed": "seed",
            "trust_remote_code": "trust_remote_code"}
    options = {option: getattr(cfg, key) for key, option in keys.items() if hasattr(cfg, key)}
    if hasattr(cfg, "vllm_sync_group_mb"):
        options["sync_group_bytes"] = int(cfg.vllm_sync_group_mb * 2 ** 20)
    options["use_bf16"] = use_bf16
    return options
