"""GRPO: sample a group of completions per prompt, score them, and push the policy toward the
completions that beat their group.

    accelerate launch --config_file accelerate_configs/zero3.yaml train_grpo.py \
        --config configs/recipe/Y.yaml key=value
    python train_grpo.py --config configs/recipe/quickstart_grpo.yaml          # CPU quickstart

One step: rollouts (`num_generations` completions per prompt) -> rewards (registered functions,
weighted sum) -> group advantages `(r - mean_group) / (std_group + eps)` -> the clipped surrogate
`-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)` per token plus
`beta * k3` KL to the reference model, reduced by `loss_type` (grpo | bnpo | dr_grpo | dapo).

Choices this script makes:
- `train_batch_size` counts completions per optimizer step (all processes); it holds
  `train_batch_size / num_generations` prompts, split evenly over processes, each process sampling whole groups.
- One generation batch serves `num_iterations` optimizer steps; old logprobs are computed once per batch
  (with `num_iterations == 1` the ratio is exactly 1 and they are not computed at all).
- Logprobs for the loss come from the training model's own forward (common/logprobs.py); with
  `unbias_log_probabilities` the logits are divided by the sampling temperature (policy and reference alike).
- Rollouts come from vLLM inside each training process (`use_vllm`, common/vllm_engine.py; weights synced after
  every optimizer step, each rollout tagged with the step whose weights sampled it), from vLLM's own server(s)
  (`use_vllm_server`, common/vllm_server.py: weights pushed through its RL endpoints after every optimizer step,
  the version each server holds checked), from the vLLM engine in a Ray actor shared by the processes (`use_ray`,
  common/ray_engine.py: weights through Ray's object store) or from transformers `generate` on the policy itself
  (`use_vllm=false`).
  `rollout/logprob_diff_*` compare the engine's sampling logprobs with the trainer's own at the same temperature.
- `share_prompt_prefix`: each distinct prompt of a micro-batch runs once, its KV cache serving its G completions.
- `logprobs_from_hidden`: the lm_head returns the completion tokens' logprobs, so [B, C, V] logits never exist whole.
  Both give the same numbers as the plain forward (common/logprobs.py, LogprobScorer).
"""
from __future__ import annotations

import functools
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from common.args import CommonArgs
from common.config import ConfigError, fail_fast, load_config, world_size_from_env
from common.data import load_train_eval
from common.logprobs import LogprobDiff, LogprobScorer, RolloutBatch, rollout_batch
from common.ops import masked_mean, masked_sum
from common.rewards import RewardResult, get_reward_factory, score_rollouts, weighted_rewards
from common.teaching import TeacherArgs

logger = logging.getLogger("train_grpo")


DEFAULT_NUM_GENERATIONS = 8


def resolve_num_generations(train_batch_size: int, num_processes: int) -> int:
    """What `num_generations: null` means: the largest group size <= 8 (>= 2) that divides train_batch_size
    into a whole number of prompts per process."""
    for size in range(DEFAULT_NUM_GENERATIONS, 1, -1):
        if train_batch_size % size == 0 and (train_batch_size // size) % num_processes == 0:
            return size
    raise ConfigError(f"key 'num_generations' = null: no group size from 2 to {DEFAULT_NUM_GENERATIONS} divides "
                      f"train_batch_size {train_batch_size} into prompts split evenly over {num_processes} "
                      f"processes; set num_generations")


@dataclass
class Config(CommonArgs):
    # trainer/grpo.yaml (spec defaults)
    max_steps: int = 200
    train_batch_size: Optional[int] = 252
    per_device_train_batch_size: Optional[int] = 3
    # completions per prompt; null: 8 when that divides the step, else the largest divisor <= 8 that does
    # (252 -> 7), so the spec's 252 resolves (resolve_num_generations; the resolved value is what is saved)
    num_generations: Optional[int] = None
    learning_rate: float = 1e-6
    beta: float = 0.04                               # k3 KL coefficient; 0 loads no reference model
    max_prompt_length: Optional[int] = 2048
    max_completion_length: int = 16384
    shuffle_generation_inputs: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    use_vllm: bool = True                            # vLLM in the training processes; false: transformers generate
    vllm_device: str = "auto"
    vllm_gpu_memory_utilization: float = 0.9
    vllm_dtype: str = "auto"
    vllm_max_model_len: Optional[int] = None
    use_ray: bool = False                            # the vLLM engine (use_vllm) in a Ray actor (common/ray_engine.py)
    ray_tensor_parallelism: int = 1                  # use_ray: the actor's engine over N GPUs (vLLM's Ray executor)
    enable_prefix_caching: bool = False
    enforce_eager: bool = True
    vllm_tensor_parallel_size: int = 1               # processes sharing one engine (must divide the process count)
    vllm_enable_sleep_mode: bool = False             # GPU only: engine memory freed while the trainer updates
    vllm_sync_group_mb: float = 256                  # ZeRO-3 weight sync: most MiB gathered at once
    use_vllm_server: bool = False                    # vLLM's own server(s) (common/vllm_server.py); over use_vllm
    vllm_host: Optional[str] = None
    vllm_port: Optional[int] = None
    vllm_servers: list[str] = field(default_factory=list)   # more policy servers, "host:port"; prompts split over all
    vllm_server_transport: Literal["auto", "gloo", "nccl"] = "auto"   # weight push; auto: nccl on GPUs, else gloo
    vllm_sync_bucket_mb: float = 256                 # weight push: most MiB per broadcast bucket
    vllm_transfer_address: Optional[str] = None      # this machine as the servers reach it; null: loopback or hostname
    vllm_server_timeout: float = 600                 # seconds per server request
    vllm_server_retries: int = 3                     # retries of a failed request (a weight update is never retried)
    student_engine: Literal["hf", "server", "ray"] = "hf"   # teacher GRPO: the frozen student's backend (hf: generate)
    student_vllm_server: Optional[str] = None        # student_engine=server: its vLLM server, "host:port"
    reward_funcs: list[str] = field(default_factory=lambda: ["math_verify"])
    reward_weights: Optional[list[float]] = None
    sync_ref_model: bool = False
    ref_model_sync_steps: int = 64
    ref_model_mixup_alpha: float = 0.6
    ref_model_name_or_path: Optional[str] = None    # null -> model_name_or_path (PEFT: the adapter-free policy)
    unbias_log_probabilities: bool = True
    log_completions: bool = False
    logging_prob: float = 0.1                        # share of completions written when log_completions
    # loss and advantages
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = 1                          # mu: optimizer steps per generation batch
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    prompt_overflow: Literal["truncate", "error"] = "truncate"
    generation_batch_size: Optional[int] = None      # prompts per generate() call; null: all at once
    share_prompt_prefix: bool = True                 # one forward per distinct prompt per micro-batch (see above)
    logprobs_from_hidden: bool = True                # lm_head returns logprobs: no [B, C, V] logits (see above)
    # eval: greedy completions on the eval split scored by the reward functions
    eval_on_start: bool = False
    eval_max_samples: Optional[int] = 256
    # reward function settings (common/rewards.py, common/judges.py)
    math_verify_timeout: int = 5
    format_pattern: str = "thinking_answer"
    reward_log_name: Optional[str] = None
    teacher_reward: dict = field(default_factory=dict)
    trainer_log_name: str = "grpo"
    # teacher GRPO (trainer/teacher_grpo.yaml, common/teaching.py): `trainer_args` set makes this a teacher run,
    # whose rollouts are student -> teacher -> student episodes
    trainer_args: Optional[TeacherArgs] = None
    student_model: Optional[str] = None             # null: the initial policy weights; a path / hub id; litellm:<model>
    student_api_base: Optional[str] = None          # litellm student: an OpenAI-compatible server's base URL
    student_api_key_env: Optional[str] = None       # litellm student: NAME of the env var holding the key
    use_reference_teacher_model: bool = False       # rlt: the KL's teacher side from the frozen reference
    max_probe_tokens: Optional[int] = None          # reward preset's; trainer_args.max_probe_tokens interpolates it
    # teacher rewards (common/teaching_rewards.py)
    teaching_partial_credit: float = 0.5
    teaching_degradation_penalty: float = 0.0
    teaching_efficiency_bonus: float = 0.0
    teaching_answer_checker: str = "math_verify"
    teaching_leak_cap: float = 0.3
    rlt_temperature: float = 1.0
    rlt_answer_log_prob_coeff: list[float] = field(default_factory=lambda: [1.0, 0.01])
    rlt_kl_penalty_coeff: list[float] = field(default_factory=lambda: [3.0, 0.03])
    rlt_solution_column: str = "solution"

    RANGES = {
        "beta": "[0, inf)", "max_prompt_length": "[1, inf)",  # num_generations: validate() (null resolves first)
        "max_completion_length": "[1, inf)", "temperature": "[0, inf)", "top_p": "(0, 1]", "top_k": "[1, inf)",
        "min_p": "[0, 1]", "repetition_penalty": "(0, inf)", "vllm_gpu_memory_utilization": "(0, 1]",
        "vllm_max_model_len": "[1, inf)", "ray_tensor_parallelism": "[1, inf)", "vllm_port": "[1, 65535]",
        "reward_weights": "(-inf, inf)", "ref_model_sync_steps": "[1, inf)", "ref_model_mixup_alpha": "[0, 1]",
        "logging_prob": "[0, 1]", "epsilon_low": "[0, 1)", "epsilon_high": "[0, inf)", "num_iterations": "[1, inf)",
        "generation_batch_size": "[1, inf)", "eval_max_samples": "[1, inf)", "math_verify_timeout": "[1, inf)",
        "vllm_tensor_parallel_size": "[1, inf)", "vllm_sync_group_mb": "(0, inf)", "vllm_sync_bucket_mb": "(0, inf)",
        "vllm_server_timeout": "(0, inf)", "vllm_server_retries": "[0, inf)",
        # teacher GRPO
        "max_probe_tokens": "[1, inf)", "teaching_partial_credit": "[0, 1]", "teaching_degradation_penalty": "(-inf, 0]",
        "teaching_efficiency_bonus": "[0, inf)", "teaching_leak_cap": "(-inf, inf)", "rlt_temperature": "(0, inf)",
        "rlt_answer_log_prob_coeff": "[0, inf)", "rlt_kl_penalty_coeff": "[0, inf)",
    }
    RESUME_MUST_MATCH = ("num_generations", "max_prompt_length", "max_completion_length", "loss_type", "beta",
                         "epsilon_low", "epsilon_high", "num_iterations", "scale_rewards", "reward_funcs",
                         "reward_weights", "temperature", "ref_model_name_or_path")

    def validate(self) -> None:
        super().validate()
        from common.rewards import REWARD_REGISTRY
        world = world_size_from_env()
        if self.num_generations is None:
            self.num_generations = resolve_num_generations(self.train_batch_size, world)
        if self.num_generations < 2:
            raise ConfigError(f"key 'num_generations' = {self.num_generations}: GRPO needs >= 2 completions per "
                              f"prompt to compare them")
        if self.train_batch_size % self.num_generations:
            raise ConfigError(f"key 'num_generations' = {self.num_generations} does not divide train_batch_size "
                              f"{self.train_batch_size} (completions per optimizer step)")
        prompts = self.train_batch_size // self.num_generations
        if prompts % world:
            raise ConfigError(f"train_batch_size / num_generations = {prompts} prompts per step cannot be split "
                              f"evenly over {world} processes")
        unknown = [name for name in self.reward_funcs if name not in REWARD_REGISTRY]
        if unknown or not self.reward_funcs:
            raise ConfigError(f"key 'reward_funcs' = {self.reward_funcs}: unknown {unknown}; available: "
                              f"{', '.join(sorted(REWARD_REGISTRY))}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"key 'reward_weights' has {len(self.reward_weights)} entries for "
                              f"{len(self.reward_funcs)} reward_funcs")
        if self.use_ray:
            from common.ray_engine import check_ray_config
            check_ray_config(self)
        if self.use_vllm_server:
            from common.vllm_server import check_server_config
            check_server_config(self)
        elif self.use_vllm:
            from common.vllm_engine import check_vllm_config
            check_vllm_config(self, world)
        if self.beta < 0:
            raise ConfigError(f"key 'beta' = {self.beta}: expected >= 0")
        if self.beta > 0 and self.sync_ref_model and self.use_peft:
            raise ConfigError("sync_ref_model=true with use_peft=true: the reference is the adapter-free policy "
                              "and cannot be synced; set sync_ref_model=false")
        self.validate_teacher()
        from common.teaching import needs_reference_model
        if (self.beta > 0 or needs_reference_model(self)) and not self.use_peft:
            reference = self.ref_model_name_or_path or self.model_name_or_path
            looks_like_hub_id = reference.count("/") == 1 and not reference.startswith((".", "/"))
            if not Path(reference).exists() and not looks_like_hub_id:
                raise ConfigError(f"beta={self.beta} needs a reference model, but {reference} does not exist; set "
                                  f"ref_model_name_or_path, use_peft=true, or beta=0")
        if self.ref_model_name_or_path and self.use_peft:
            raise ConfigError("ref_model_name_or_path is ignored with use_peft=true (the reference is the "
                              "adapter-free policy); remove one of them")
        if self.num_iterations < 1:
            raise ConfigError(f"key 'num_iterations' = {self.num_iterations}: expected >= 1")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ConfigError("loss_type=dr_grpo needs max_completion_length")

    def validate_teacher(self) -> None:
        from common.rewards import TEACHING_REWARDS
        from common.teaching import check_teacher_args, is_api_student, student_is_reference
        from common.teaching_rewards import ANSWER_CHECKERS
        if self.trainer_args is None:
            asked = [name for name in self.reward_funcs if name in TEACHING_REWARDS]
            if asked:
                raise ConfigError(f"key 'reward_funcs' has {asked}, which score teacher episodes: use the teacher "
                                  f"preset (trainer: teacher_grpo, which sets trainer_args)")
            if self.student_model is not None:
                raise ConfigError("key 'student_model' is read only by a teacher run (trainer: teacher_grpo)")
            return
        check_teacher_args(self.trainer_args)
        if self.max_probe_tokens is not None and self.max_probe_tokens != self.trainer_args.max_probe_tokens:
            raise ConfigError(f"max_probe_tokens = {self.max_probe_tokens} but trainer_args.max_probe_tokens = "
                              f"{self.trainer_args.max_probe_tokens}: one budget, set max_probe_tokens (the trainer "
                              f"preset interpolates it)")
        if self.teaching_answer_checker not in ANSWER_CHECKERS:
            raise ConfigError(f"key 'teaching_answer_checker' = {self.teaching_answer_checker!r}: expected one of "
                              f"{', '.join(ANSWER_CHECKERS)}")
        if self.teaching_degradation_penalty > 0:
            raise ConfigError(f"key 'teaching_degradation_penalty' = {self.teaching_degradation_penalty}: expected "
                              f"a value <= 0")
        if not 0 <= self.teaching_leak_cap <= 1:
            raise ConfigError(f"key 'teaching_leak_cap' = {self.teaching_leak_cap}: expected a value in [0, 1]")
        if is_api_student(self.student_model):
            if "rlt" in self.reward_funcs:
                raise ConfigError(f"reward 'rlt' needs the student's logprobs, which the API student "
                                  f"{self.student_model!r} does not give; use a local student_model or another reward")
            if self.student_api_key_env is not None and not re.fullmatch(r"[A-Za-z_]\w*", self.student_api_key_env):
                raise ConfigError("key 'student_api_key_env': expected the NAME of an environment variable, never "
                                  "the key itself")
        elif self.student_model is not None:
            looks_like_hub_id = self.student_model.count("/") == 1 and not self.student_model.startswith((".", "/"))
            if not Path(self.student_model).exists() and not looks_like_hub_id:
                raise ConfigError(f"key 'student_model' = {self.student_model!r}: no such directory (expected null, "
                                  f"a local model, a hub id or litellm:<provider/model>)")
        if student_is_reference(self) and self.sync_ref_model:
            raise ConfigError("student_model=null (the student is the frozen initial weights) with "
                              "sync_ref_model=true would update the student; set one of them differently")


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
):
    """Clipped GRPO surrogate + k3 KL for one micro-batch -> (loss, metrics).

    logps, old_logps, ref_logps, mask: [B, T] over completion tokens; advantages: [B].
    `old_logps` None means the rollout policy is the current one (ratio 1, gradient intact);
    `ref_logps` may be None only when beta == 0. Reductions of the per-token loss L:
      grpo     mean over each sequence's tokens, then over the B sequences
      bnpo     sum(L) / number of unmasked tokens in this micro-batch
      dr_grpo  sum(L) / (B * max_completion_length)
      dapo     sum(L) / num_items_in_batch, the unmasked token count of the whole optimizer step
               (all processes, all accumulation micro-batches). Each micro-batch's loss is then its
               share of one global token mean: sum the micro-batch losses over accumulation and
               processes (scale by the world size under DDP gradient averaging), do not average them.
    Metrics (detached 0-d tensors, token means over `mask`): kl (when ref_logps is given),
    clip_ratio/low (ratio < 1 - epsilon_low with A < 0), clip_ratio/high (ratio > 1 + epsilon_high
    with A > 0), clip_ratio/region (either: the tokens whose gradient the clip removes).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if ref_logps is None and beta != 0.0:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={beta})")
    if logps.dim() != 2 or advantages.shape != logps.shape[:1] or mask.shape != logps.shape:
        raise ValueError(
            f"expected logps/mask [B, T] and advantages [B]; got logps {tuple(logps.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    mask = mask.to(logps.dtype)  # [B, T]
    if old_logps is None:
        old_logps = logps.detach()
    advantages = advantages.to(logps.dtype).unsqueeze(1)  # [B, 1]

    ratio = torch.exp(logps - old_logps)  # [B, T]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [B, T]
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # [B, T]

    per_token_kl = None
    if ref_logps is not None:
        log_ref_over_policy = ref_logps - logps  # [B, T]
        per_token_kl = torch.exp(log_ref_over_policy) - log_ref_over_policy - 1  # [B, T] k3 >= 0
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type == "grpo":
        loss = masked_mean(per_token_loss, mask, dim=1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token_loss, mask)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = masked_sum(per_token_loss, mask) / (logps.shape[0] * max_completion_length)
    else:  # dapo
        if num_items_in_batch is None:
            raise ValueError("loss_type 'dapo' needs num_items_in_batch (completion tokens in the optimizer step)")
        num_items = torch.as_tensor(num_items_in_batch, dtype=logps.dtype, device=logps.device)
        loss = masked_sum(per_token_loss, mask) / num_items.clamp(min=1.0)

    with torch.no_grad():
        is_low_clipped = (ratio < 1 - epsilon_low) & (advantages < 0)  # [B, T]
        is_high_clipped = (ratio > 1 + epsilon_high) & (advantages > 0)  # [B, T]
        metrics = {
            "clip_ratio/low": masked_mean(is_low_clipped.to(mask.dtype), mask),
            "clip_ratio/high": masked_mean(is_high_clipped.to(mask.dtype), mask),
            "clip_ratio/region": masked_mean((is_low_clipped | is_high_clipped).to(mask.dtype), mask),
        }
        if per_token_kl is not None:
            metrics["kl"] = masked_mean(per_token_kl, mask)
    return loss, metrics


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
):
    """Group-relative advantages -> (advantages [N], stats).

    rewards: [N] float, N = groups * num_generations with each group's completions adjacent;
    NaN marks a missing reward (every function returned None). A NaN reward is left out of its
    group's statistics and gets advantage 0. advantage = (r - mean_group) / (std + eps), where
    std (unbiased, over non-NaN rewards) is the group's ("group"), the whole batch's ("batch"),
    or no division at all ("none"). A group with fewer than two rewards has std 0.
    stats (floats): reward_mean, reward_std (over non-NaN rewards), frac_reward_none, and
    frac_zero_std_groups: groups whose rewards all agree (or number < 2), so carry no signal.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be [N] with N a multiple of num_generations={num_generations}; got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, num_generations)  # [G, K]
    valid = ~torch.isnan(grouped)  # [G, K]
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))  # [G, K]
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)  # [G, 1]
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1.0)  # [G, 1]
    centered = torch.where(valid, grouped - mean, torch.zeros_like(grouped))  # [G, K]
    group_std = (centered.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1.0)).sqrt()  # [G, 1]

    all_valid = rewards[~torch.isnan(rewards)]  # [M]
    batch_std = all_valid.std() if all_valid.numel() > 1 else rewards.new_zeros(())
    if scale_rewards == "group":
        advantages = centered / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = centered / (batch_std + eps)
    else:
        advantages = centered

    no_signal = (count < 2) | torch.isclose(group_std, torch.zeros_like(group_std))  # [G, 1]
    stats = {
        "reward_mean": all_valid.mean().item() if all_valid.numel() else float("nan"),
        "reward_std": batch_std.item(),
        "frac_reward_none": 1.0 - all_valid.numel() / rewards.numel(),
        "frac_zero_std_groups": no_signal.float().mean().item(),
    }
    return advantages.reshape(-1), stats


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    with fail_fast():
        cfg = load_config(Config, argv, description=__doc__)

    # ----- setup -----------------------------------------------------------------------------------------------------
    from common.loop import checkpoint_on_server_failure, claim_output_dir, start, training_run
    from common.models import prepare_frozen_model
    from common.rollout import HFGenerateEngine, make_engine, vllm_options
    from common.runtime import bf16_supported

    accelerator, resume_path = start(cfg)
    use_bf16 = cfg.bf16 and bf16_supported()
    prompts_per_step = cfg.train_batch_size // cfg.num_generations

    # ----- data and rewards (before models: bad input fails fast) ----------------------------------------------------
    with fail_fast():
        if cfg.use_vllm_server:   # a server that is down stops the run here, named, before any model loads
            from common.vllm_server import check_servers_up, parse_servers
            check_servers_up(parse_servers(cfg.vllm_host, cfg.vllm_port, cfg.vllm_servers), "vllm_host")
        inputs = load_inputs(cfg, prompts_per_step)
        # the actor's engine starts before any model loads: one that cannot start (vLLM refuses its Ray executor on
        # CPU) is one error line, nothing written
        ray_engine = None
        if cfg.use_ray:
            from common.ray_engine import ray_options
            ray_engine = make_engine("ray", **ray_options(cfg, inputs.tokenizer, accelerator, use_bf16))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(
        1, math.ceil(len(inputs.train_examples) // prompts_per_step * cfg.num_train_epochs) * cfg.num_iterations)
    claimed = claim_output_dir(cfg, resume_path, accelerator.is_main_process)   # locked until the run ends
    logger.info("%d train prompts, %d eval, %d prompts x %d completions per step, %d steps",
                len(inputs.train_examples), len(inputs.eval_examples), prompts_per_step, cfg.num_generations,
                total_steps)

    # ----- models ----------------------------------------------------------------------------------------------------
    model, reference, student = load_models(cfg, inputs.teacher, use_bf16)
    with training_run(cfg, accelerator, model, total_steps, resume_path, claimed) as run:
        model = run.model
        reference = prepare_frozen_model(accelerator, reference) if reference is not None else None
        student = prepare_frozen_model(accelerator, student) if student is not None else None
        if run.resume_path is not None and reference is not None and cfg.sync_ref_model:
            load_synced_reference(cfg, accelerator, reference, run.resume_path, use_bf16)
        if ray_engine is not None:   # the vLLM engine in a Ray actor, synced with the training weights
            engine = ray_engine
        elif cfg.use_vllm_server:   # vLLM's own server(s), synced with the training weights (resumed ones too)
            from common.vllm_server import server_options
            engine = make_engine("server", **server_options(cfg, inputs.tokenizer, accelerator))
        elif cfg.use_vllm:   # loaded from the policy's path, then synced with the training weights (resumed ones too)
            engine = make_engine("vllm", model_path=cfg.model_name_or_path, tokenizer=inputs.tokenizer,
                                 accelerator=accelerator, **vllm_options(cfg, use_bf16))
        else:
            engine = HFGenerateEngine(model, inputs.tokenizer, accelerator=accelerator,
                                      batch_size=cfg.generation_batch_size, share_prompt_prefill=cfg.share_prompt_prefix)
        run.close_at_exit(engine)
        with checkpoint_on_server_failure(accelerator, model, inputs.tokenizer, cfg, 0, {}):
            weights_version = engine.sync_weights(model, version=run.start_step)   # = the optimizer step of weights
        if inputs.teacher is not None:   # >>> teacher run: the student's engine and the episode loop on the models
            inputs.teacher.connect(accelerator, model, reference, student, engine, inputs.tokenizer,
                                   inputs.reward_functions)
            student_engine = getattr(inputs.teacher.student, "engine", None)
            if student_engine is not None and student_engine is not engine:
                run.close_at_exit(student_engine)
        completed = train(cfg, run, inputs, engine, weights_version, reference, prompts_per_step)
    if completed:
        accelerator.end_training()


@dataclass
class Inputs:
    """What a run reads before any model loads: data, prompts, reward functions, a teacher run's checks."""
    tokenizer: object
    train_examples: list
    eval_examples: list
    prompts: list                     # (rendered text, token ids) per training example
    reward_functions: list            # (name, function)
    teacher: Optional[object] = None  # a TeacherRun (trainer_args set)


def load_inputs(cfg, prompts_per_step: int) -> Inputs:
    from common.models import check_model_source, load_tokenizer
    from common.teaching import TeacherRun
    check_model_source("model_name_or_path", cfg.model_name_or_path)
    if cfg.ref_model_name_or_path:
        check_model_source("ref_model_name_or_path", cfg.ref_model_name_or_path)
    train_examples, eval_examples = load_train_eval(cfg)
    if len(train_examples) < prompts_per_step:
        raise ValueError(f"{len(train_examples)} training prompts, fewer than the {prompts_per_step} prompts per "
                         f"step (train_batch_size / num_generations)")
    reward_functions = [(name, get_reward_factory(name)(cfg)) for name in cfg.reward_funcs]
    tokenizer = load_tokenizer(cfg)
    prompts = encode_prompts(cfg, tokenizer, train_examples)
    # >>> teacher run: student checks (loads, tokenizer, rlt's columns) before any model loads
    teacher = TeacherRun.prepare(cfg, reward_functions, train_examples, tokenizer) if cfg.trainer_args else None
    return Inputs(tokenizer, train_examples, eval_examples, prompts, reward_functions, teacher)


def train(cfg, run, inputs: Inputs, engine, weights_version: int, reference, prompts_per_step: int) -> bool:
    """The GRPO loop: rollout -> reward -> old / reference logprobs -> update -> log -> checkpoint, then the final
    save and eval. False when a preemption stopped it."""
    from common.loop import MetricSums, checkpoint_on_server_failure
    accelerator, model, tokenizer, teacher = run.accelerator, run.model, inputs.tokenizer, inputs.teacher
    rank, world, reward_functions = accelerator.process_index, accelerator.num_processes, inputs.reward_functions
    sampling = sampling_params(cfg)
    policy, reference_scorer = make_scorers(cfg, accelerator, model, reference)
    evaluate = functools.partial(evaluate_policy, cfg, run, teacher, engine, tokenizer, inputs.eval_examples,
                                 functools.partial(combined_reward, reward_functions, cfg.reward_weights))
    do_eval = cfg.do_eval and bool(inputs.eval_examples)
    start_eval = evaluate(run.start_step) if cfg.eval_on_start and do_eval else None

    # ----- train -------------------------------------------------------------------------------------------------
    model.train()
    batches: list[RolloutBatch] = []
    step = run.start_step
    for step in range(run.start_step + 1, run.total_steps + 1):
        step_start = time.time()
        metrics: dict[str, float] = {}
        fresh_rollouts = (step - 1) % cfg.num_iterations == 0 or not batches
        if fresh_rollouts:   # sampled by the weights the first update of this batch starts from
            # ----- rollout -------------------------------------------------------------------------------------
            local_indices = step_prompts(cfg, step, len(inputs.train_examples), prompts_per_step, rank, world)
            # a server down: a checkpoint of the weights so far, then stop
            with checkpoint_on_server_failure(accelerator, model, tokenizer, cfg, step - 1,
                                              {"generation_round": (step - 1) // cfg.num_iterations}):
                rollouts, episodes = sample_rollouts(run, engine, teacher, sampling, inputs, local_indices, step,
                                                     weights_version)
            generate_seconds = time.time() - step_start

            # ----- reward --------------------------------------------------------------------------------------
            samples = episodes.inputs if teacher is not None else reward_inputs(inputs, rollouts, local_indices)
            rewards = score_rewards(cfg, accelerator, reward_functions, samples, teacher, episodes)   # all processes
            local_rewards = rewards.local(rank, world)
            reward_seconds = time.time() - step_start - generate_seconds
            metrics.update({**reward_metrics(rewards, reward_functions), "time/reward": reward_seconds,
                            **rollout_metrics(accelerator, rollouts, generate_seconds, weights_version)})
            if cfg.log_completions:
                log_sampled_completions(cfg, run, samples, local_rewards, step)
            if teacher is not None:   # >>> teacher metrics and the sampled episodes, whole
                metrics.update(teacher.step_metrics(accelerator, episodes))
                log_episodes(teacher, accelerator, episodes, local_rewards, reward_functions, step)

            # ----- old and reference logprobs, once per generation batch ---------------------------------------
            batches = scored_batches(cfg, accelerator, rollouts, local_rewards.advantages, tokenizer.pad_token_id,
                                     policy, reference_scorer)
            metrics["tokens"] = run.sum_over_processes(sum(int(b.attention_mask.sum()) for b in batches)).item()

        # ----- update ------------------------------------------------------------------------------------------
        train_start = time.time()
        num_items = run.sum_over_processes(sum(float(b.completion_mask.sum()) for b in batches))
        # dapo divides by the step's global token count: undo accelerate's 1/accum and DDP's 1/world
        accum = cfg.gradient_accumulation_steps
        scale = accum * world if cfg.loss_type == "dapo" else 1.0
        sums = MetricSums(accelerator.device)
        logprob_diff = LogprobDiff(accelerator.device) if fresh_rollouts and \
            sampling.temperature == policy.temperature else None
        for batch in batches:
            with accelerator.accumulate(model):
                logps = policy(batch)                                                                   # [B, C]
                loss, loss_metrics = grpo_loss(
                    logps, batch.old_logps, batch.ref_logps, batch.advantages, batch.completion_mask,
                    loss_type=cfg.loss_type, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                    beta=cfg.beta, max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items)
                accelerator.backward(loss * scale)
            if logprob_diff is not None:
                logprob_diff.add(logps, batch)
            sums.add({"loss": loss.detach() * scale / accum, **loss_metrics})
        grad_norm = run.optimizer_step(sums["loss"], step)
        sync_start = time.time()
        with checkpoint_on_server_failure(accelerator, model, tokenizer, cfg, step,
                                          {"generation_round": step // cfg.num_iterations}):
            weights_version = engine.sync_weights(model, version=step)   # the next rollouts sample these weights
        metrics["time/weight_sync"] = time.time() - sync_start
        if cfg.use_vllm_server or cfg.use_ray:   # the packer's figures: buckets, megabytes, GB/s
            metrics.update(engine.sync_metrics())
        if reference is not None and cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
            sync_reference(accelerator, model, reference, cfg.ref_model_mixup_alpha)

        # ----- log ---------------------------------------------------------------------------------------------
        means = sums.reduced(accelerator, reduction="mean")
        elapsed = time.time() - step_start
        metrics.update({"loss": means.pop("loss"), **{name: value / len(batches) for name, value in means.items()},
                        **run.step_metrics(grad_norm), "time/train": time.time() - train_start,
                        "step_seconds": elapsed, **(logprob_diff.metrics(accelerator) if logprob_diff else {})})
        if teacher is not None:
            metrics["time/update"] = metrics["time/train"]
        if "tokens" in metrics:
            metrics["tokens_per_second"] = metrics.pop("tokens") / max(elapsed, 1e-9)
        if run.should_log(step, grad_norm):
            run.tracker.log(metrics, step)
        if do_eval and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step != run.total_steps:
            evaluate(step)

        # ----- checkpoint --------------------------------------------------------------------------------------
        if run.checkpoint_or_stop(tokenizer, step, extra_models={"ref_model": reference}
                                  if reference is not None and cfg.sync_ref_model else None):
            return False

    # ----- final save and eval -----------------------------------------------------------------------------------
    run.finish(tokenizer, step)
    if do_eval:
        print_final_table(cfg, run, teacher, start_eval, evaluate(step), step)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Stages of a step
# ---------------------------------------------------------------------------------------------------------------------

def step_prompts(cfg, step: int, num_examples: int, prompts_per_step: int, rank: int, world: int) -> list[int]:
    """This process's training prompts for the generation round of `step` (one round serves num_iterations
    steps; each epoch a fresh seeded order)."""
    from common.runtime import global_batches, shard
    epoch, round_in_epoch = divmod((step - 1) // cfg.num_iterations, num_examples // prompts_per_step)
    prompt_indices = global_batches(num_examples, prompts_per_step, cfg.seed, epoch, cfg.shuffle_generation_inputs)
    return shard(prompt_indices[round_in_epoch], rank, world)


def sampling_params(cfg):
    from common.rollout import SamplingParams
    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                          repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_completion_length,
                          num_generations=cfg.num_generations)


def encode_prompts(cfg, tokenizer, train_examples: list) -> list[tuple[str, list[int]]]:
    """Each training prompt as (rendered text, token ids cut to max_prompt_length per prompt_overflow)."""
    from common.data import render_prompt
    from common.rollout import truncate_prompts
    texts = [render_prompt(tokenizer, e.prompt) for e in train_examples]
    ids, num_truncated = truncate_prompts([tokenizer(text, add_special_tokens=False).input_ids for text in texts],
                                          cfg.max_prompt_length, on_overflow=cfg.prompt_overflow)
    if num_truncated:
        logger.warning("%d of %d prompts are longer than max_prompt_length=%d tokens: their start is cut off "
                       "(set prompt_overflow=error to stop instead)", num_truncated, len(ids), cfg.max_prompt_length)
    return list(zip(texts, ids))


def load_models(cfg, teacher, use_bf16: bool):
    """-> (policy, reference or None, a teacher run's own student or None); the frozen ones not yet placed."""
    from common.models import load_causal_lm
    from common.teaching import is_api_student, needs_reference_model
    model = load_causal_lm(cfg, use_bf16=use_bf16)
    reference = None
    if (cfg.beta != 0 or needs_reference_model(cfg)) and not cfg.use_peft:
        reference = load_causal_lm(cfg, cfg.ref_model_name_or_path or cfg.model_name_or_path, use_bf16=use_bf16,
                                   trainable=False)
    student = None   # >>> teacher run: a student model of its own (frozen, never updated)
    if teacher is not None and cfg.student_model is not None and not is_api_student(cfg.student_model):
        student = load_causal_lm(cfg, cfg.student_model, use_bf16=use_bf16, trainable=False)
    return model, reference, student


def load_synced_reference(cfg, accelerator, reference, resume_path: Path, use_bf16: bool) -> None:
    """sync_ref_model: the resumed checkpoint's reference weights (saved beside the policy's), when it has them."""
    from common.models import load_causal_lm
    if (resume_path / "ref_model").is_dir():
        synced = load_causal_lm(cfg, str(resume_path / "ref_model"), use_bf16=use_bf16, trainable=False)
        accelerator.unwrap_model(reference).load_state_dict(synced.state_dict())


def make_scorers(cfg, accelerator, model, reference):
    """The policy's LogprobScorer and the reference's (None when beta == 0: no KL term). With PEFT the reference is
    the policy with its adapters disabled."""
    temperature = cfg.temperature if cfg.unbias_log_probabilities and cfg.temperature > 0 else 1.0
    options = dict(share_prompts=cfg.share_prompt_prefix, from_hidden=cfg.logprobs_from_hidden)
    policy = LogprobScorer(accelerator, model, "policy", temperature, keeps_cache=not cfg.gradient_checkpointing,
                           **options)
    if cfg.beta == 0:
        return policy, None
    if reference is None:
        return policy, LogprobScorer.adapter_free(policy)
    return policy, LogprobScorer(accelerator, reference, "reference model", temperature, **options)


def sample_rollouts(run, engine, teacher, sampling, inputs: Inputs, local_indices: list, step: int,
                    weights_version: int):
    """This process's rollouts of the step (prompts x G, each group adjacent) -> (rollouts, teacher episodes or None).
    A teacher run's rollouts are the teacher's samples of student -> teacher -> student episodes."""
    from common.loop import finite_sampling
    episodes = None
    if teacher is not None:   # >>> teacher run: episodes; the rollouts' prompts are the teacher prompts
        episodes = teacher.loop.run([inputs.train_examples[i] for i in local_indices], sampling, step)
        rollouts = episodes.rollouts
    else:
        with finite_sampling(run.accelerator, step, run.model):
            rollouts = engine.generate([inputs.prompts[i][1] for i in local_indices], sampling)   # prompts x G
    stale = sorted({r.weights_version for r in rollouts} - {weights_version})
    if stale:
        raise RuntimeError(f"step {step}: rollouts sampled with weights version(s) {stale}, the policy's is "
                           f"{weights_version} (a weight sync was missed)")
    return rollouts, episodes


def reward_inputs(inputs: Inputs, rollouts: list, local_indices: list) -> list:
    """What the reward functions see of each rollout: its example, its completion and its prompt text."""
    from common.evaluation import build_reward_inputs
    example_ids = [local_indices[r.prompt_index] for r in rollouts]
    return build_reward_inputs([inputs.train_examples[i] for i in example_ids], [r.completion_text for r in rollouts],
                               [inputs.prompts[i][0] for i in example_ids])


def score_rewards(cfg, accelerator, reward_functions: list, inputs: list, teacher, episodes) -> RewardResult:
    """Score this process's samples, gather every process's, weight, and take group advantages."""
    per_function = score_rollouts(reward_functions, inputs)                                    # [N_local, F]
    if teacher is not None:   # >>> a sample whose student call failed is unscored, never wrong
        per_function = teacher.mask_failed(per_function, episodes)
    per_function = accelerator.gather(per_function.to(accelerator.device)).cpu()             # [N, F]
    combined = weighted_rewards(per_function, cfg.reward_weights)                             # [N]
    advantages, stats = group_advantages(combined, cfg.num_generations, cfg.scale_rewards)
    return RewardResult(per_function, combined, advantages, stats)


def combined_reward(reward_functions: list, weights: Optional[list[float]], inputs: list) -> list:
    """The weighted reward as a reward function (None where every function returned None): for the evals."""
    rewards = weighted_rewards(score_rollouts(reward_functions, inputs), weights)
    return [None if math.isnan(r) else float(r) for r in rewards.tolist()]


def reward_metrics(rewards: RewardResult, reward_functions: list) -> dict:
    """Mean and std of each reward function (over the samples it scored), the functions' own, the batch's."""
    metrics = {}
    for f, (name, function) in enumerate(reward_functions):
        column = rewards.per_function[:, f]
        scored = column[~column.isnan()]
        metrics[f"rewards/{name}/mean"] = column.nanmean().item()
        metrics[f"rewards/{name}/std"] = scored.std().item() if scored.numel() > 1 else 0.0
        if hasattr(function, "pop_metrics"):
            metrics.update(function.pop_metrics())
    return {**metrics, "reward": rewards.stats["reward_mean"], "reward_std": rewards.stats["reward_std"],
            "frac_reward_none": rewards.stats["frac_reward_none"],
            "frac_zero_std_groups": rewards.stats["frac_zero_std_groups"]}


def rollout_metrics(accelerator, rollouts: list, generate_seconds: float, weights_version: int) -> dict:
    """Completion lengths and truncation over every process, generation time and throughput."""
    lengths = torch.tensor([float(len(r.completion_ids)) for r in rollouts], device=accelerator.device)
    truncated = torch.tensor([float(r.finish_reason == "length") for r in rollouts], device=accelerator.device)
    lengths, truncated = accelerator.gather(lengths), accelerator.gather(truncated)
    return {"completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
            "completions/truncated_frac": truncated.mean().item(), "time/generate": generate_seconds,
            "rollout/weights_version": float(weights_version),
            "rollout/tokens_per_second": lengths.sum().item() / max(generate_seconds, 1e-9)}


def log_sampled_completions(cfg, run, samples: list, local_rewards: RewardResult, step: int) -> None:
    """log_completions: a `logging_prob` share of the step's samples (seeded per step) -> completions.jsonl."""
    from accelerate.utils import gather_object
    picker = random.Random(cfg.seed * 1_000_003 + step)
    samples = [{"prompt": item.prompt, "completion": item.completion, "ground_truth": item.ground_truth,
                "reward": None if math.isnan(float(local_rewards.combined[i])) else float(local_rewards.combined[i]),
                "advantage": float(local_rewards.advantages[i])}
               for i, item in enumerate(samples) if picker.random() < cfg.logging_prob]
    run.tracker.log_completions(gather_object(samples), step)


def log_episodes(teacher, accelerator, episodes, local_rewards: RewardResult, reward_functions: list, step: int):
    """A teacher run's sampled episodes, whole, with their rewards (combined and per function) and advantages."""
    per_function = {name: local_rewards.per_function[:, f].tolist() for f, (name, _) in enumerate(reward_functions)}
    teacher.log_episodes(accelerator, episodes, local_rewards.combined.tolist(), local_rewards.advantages.tolist(),
                         per_function, step)


def scored_batches(cfg, accelerator, rollouts: list, advantages: torch.Tensor, pad_token_id: int,
                   policy: LogprobScorer, reference: Optional[LogprobScorer]) -> list[RolloutBatch]:
    """The generation batch's micro-batches on the device, with advantages, old logprobs (num_iterations > 1) and
    reference logprobs (beta > 0). The scorers check their lm_head path on the first one."""
    batches = []
    for start in range(0, len(rollouts), cfg.per_device_train_batch_size):
        chunk = rollouts[start: start + cfg.per_device_train_batch_size]
        batch = rollout_batch(chunk, pad_token_id, cfg.mask_truncated_completions,
                              share_prompts=cfg.share_prompt_prefix).to(accelerator.device)
        batch.advantages = advantages[start: start + len(chunk)].to(accelerator.device)
        policy.verify(batch)
        if reference is not None:
            reference.verify(batch)
        with torch.no_grad():
            # the same forward as the update's, so the first ratio is exactly 1
            batch.old_logps = policy(batch) if cfg.num_iterations > 1 else None
            batch.ref_logps = reference(batch) if reference is not None else None
        batches.append(batch)
    return batches


def evaluate_policy(cfg, run, teacher, engine, tokenizer, eval_examples: list, reward_fn, step: int) -> dict:
    """Greedy completions on the eval split scored by the weighted reward (a teacher run: greedy teacher, greedy
    student, with and without the teaching); logged at `step`."""
    from common.evaluation import greedy_eval
    if teacher is not None:
        result = teacher.loop.evaluate(run.accelerator, eval_examples[:cfg.eval_max_samples],
                                       cfg.max_completion_length, batch_size=cfg.per_device_eval_batch_size * 8)
        run.tracker.log({"eval/teacher/student_accuracy": result["student_accuracy"],
                         "eval/teacher/baseline_accuracy": result["baseline_accuracy"],
                         "eval/num_samples": result["num_scored"]}, step)
        return result
    result = greedy_eval(run.accelerator, run.model, tokenizer, eval_examples, reward_fn, cfg.max_completion_length,
                         cfg.eval_max_samples, batch_size=cfg.per_device_eval_batch_size * 8,
                         engine=engine if cfg.use_vllm or cfg.use_vllm_server else None)
    run.tracker.log({"eval/reward": result["accuracy"], "eval/num_samples": result["num_scored"]}, step)
    return result


def print_final_table(cfg, run, teacher, start_eval: Optional[dict], final_eval: dict, step: int) -> None:
    from common.evaluation import format_accuracy_table, start_rows
    from common.teaching import format_teacher_table
    if not run.accelerator.is_main_process:
        return
    final = (f"GRPO ({cfg.output_dir}, step {step})", final_eval)
    if teacher is not None:
        print(format_teacher_table(([("start", start_eval)] if start_eval else []) + [final]), flush=True)
    else:
        print(format_accuracy_table(start_rows(cfg.output_dir, cfg.model_name_or_path, run.start_step, start_eval)
                                    + [final]), flush=True)


def sync_reference(accelerator, model, reference, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference (TR-DPO style mixup), gathered under ZeRO-3."""
    policy_params = list(accelerator.unwrap_model(model).parameters())
    reference_params = list(accelerator.unwrap_model(reference).parameters())
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    for policy_param, reference_param in zip(policy_params, reference_params):
        if zero3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([policy_param, reference_param], modifier_rank=0):
                if accelerator.is_main_process:
                    reference_param.data.mul_(1 - alpha).add_(policy_param.data, alpha=alpha)
        else:
            reference_param.data.mul_(1 - alpha).add_(policy_param.data.to(reference_param.dtype), alpha=alpha)


if __name__ == "__main__":
    main()
