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
  the version each server holds checked) or from transformers `generate` on the policy itself (`use_vllm=false`).
  `rollout/logprob_diff_*` compare the engine's sampling logprobs with the trainer's own at the same temperature.
- `share_prompt_prefix`: in each micro-batch every distinct prompt runs through the model once and its KV
  cache serves all of its completions (the G rows of a group repeat the prompt); generation prefills each
  prompt once too. Same logprobs and gradients to float rounding, prompt compute / G. Off for the gradient pass under gradient checkpointing, which drops
  caches; models whose forward takes no cache run every row in full.
- `logprobs_from_hidden`: while a logprob forward runs, the model's lm_head computes the logprobs of the
  completion tokens from its input hidden states in chunks instead of returning logits, so
  the [B, C, V] logits (and their gradient) never exist whole. Checked once on the first batch against the
  logits path; models that change logits after lm_head (softcapping, scaling) keep the logits path.
"""
from __future__ import annotations

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
from common.config import ConfigError, config_to_dict, fail_fast, load_config, world_size_from_env
from common.logprobs import completion_logprobs, lm_head_logprobs_agree, rollout_batch
from common.ops import masked_mean, masked_sum
from common.rewards import combine_rewards
from common.teaching import TeacherArgs
from common.tracking import setup_logging

logger = logging.getLogger("train_grpo")


@dataclass
class Config(CommonArgs):
    # trainer/grpo.yaml (spec defaults)
    max_steps: int = 200
    train_batch_size: Optional[int] = 252
    per_device_train_batch_size: Optional[int] = 3
    num_generations: Optional[int] = None           # null -> 8
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
    use_ray: bool = False
    ray_tensor_parallelism: int = 1
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
    student_engine: Literal["hf", "server"] = "hf"   # teacher GRPO: the frozen student's backend (hf: generate)
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
        if self.num_generations is None:
            self.num_generations = 8
        if self.num_generations < 2:
            raise ConfigError(f"key 'num_generations' = {self.num_generations}: GRPO needs >= 2 completions per "
                              f"prompt to compare them")
        world = world_size_from_env()
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
# Batching and logprobs
# ---------------------------------------------------------------------------------------------------------------------

def score_rollouts(reward_functions: list, inputs: list) -> torch.Tensor:
    """[N, F] rewards, NaN where a function returned None (not applicable)."""
    columns = []
    for name, function in reward_functions:
        values = function(inputs)
        if len(values) != len(inputs):
            raise RuntimeError(f"reward function {name!r} returned {len(values)} values for {len(inputs)} samples")
        columns.append([math.nan if v is None else float(v) for v in values])
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(inputs), len(columns))


def engine_logprobs(rollouts: list, width: int, device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The engine's sampling logprobs as [B, C] (zeros past each completion) and their mask, or (None, None)."""
    if any(r.logprobs is None for r in rollouts):
        return None, None
    values = torch.zeros((len(rollouts), width), dtype=torch.float32)   # [B, C]
    mask = torch.zeros((len(rollouts), width), dtype=torch.float32)     # [B, C]
    for i, r in enumerate(rollouts):
        values[i, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        mask[i, :len(r.logprobs)] = 1.0
    return values.to(device), mask.to(device)


def weighted_rewards(per_function: torch.Tensor, weights: Optional[list[float]]) -> torch.Tensor:
    """[N, F] (NaN = None) -> [N] through `combine_rewards`; NaN where every function returned None."""
    columns = [[None if math.isnan(v) else v for v in column] for column in per_function.T.tolist()]
    combined = combine_rewards(columns, weights)
    return torch.tensor([math.nan if r is None else r for r in combined], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    with fail_fast():
        cfg = load_config(Config, argv, description=__doc__)
    setup_logging(cfg.activate_debugging_logs)

    # ----- setup -----------------------------------------------------------------------------------------------------
    from accelerate.utils import gather_object, set_seed

    from common.checkpoint import PreemptionFlag, load_checkpoint, push_final_model, resolve_resume_path, save_model
    from common.loop import (SKIPPED, NonFiniteCounter, check_output_dir, checkpoint_on_server_failure,
                             checkpoint_or_stop, claim_output_dir, ensure_finite_weights, finite_sampling,
                             optimizer_step, resumed_step, step_metrics)
    from common.data import load_train_eval, render_prompt
    from common.evaluation import build_reward_inputs, greedy_eval
    from common.logprobs import cache_argument, plain_lm_head
    from common.models import check_model_source, load_causal_lm, load_tokenizer, prepare_frozen_model
    from common.rewards import get_reward_factory
    from common.rollout import HFGenerateEngine, SamplingParams, make_engine, truncate_prompts, vllm_options
    from common.runtime import (bf16_supported, global_batches, make_accelerator, make_optimizer, make_scheduler,
                                shard)
    from common.teaching import TeacherRun, format_teacher_table, is_api_student, needs_reference_model
    from common.tracking import Tracker

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    use_bf16 = cfg.bf16 and bf16_supported()
    group = cfg.num_generations
    prompts_per_step = cfg.train_batch_size // group
    accum = cfg.gradient_accumulation_steps

    # ----- data and rewards (before models: bad input fails fast) ----------------------------------------------------
    with fail_fast():
        if cfg.use_ray:   # checked here, not in validate(), so --print-config resolves it
            raise ConfigError("use_ray: engines as Ray actors are not available yet; set use_ray=false "
                              "(use_vllm_server=true runs vLLM's own server, use_vllm=true vLLM in the training "
                              "processes)")
        if cfg.use_vllm_server:   # a server that is down stops the run here, named, before any model loads
            from common.vllm_server import check_servers_up, parse_servers
            check_servers_up(parse_servers(cfg.vllm_host, cfg.vllm_port, cfg.vllm_servers), "vllm_host")
        check_model_source("model_name_or_path", cfg.model_name_or_path)
        if cfg.ref_model_name_or_path:
            check_model_source("ref_model_name_or_path", cfg.ref_model_name_or_path)
        resume_path = resolve_resume_path(cfg.resume_from_checkpoint, cfg.output_dir)
        check_output_dir(cfg, resume_path, accelerator.is_main_process)
        train_examples, eval_examples = load_train_eval(cfg)
        if len(train_examples) < prompts_per_step:
            raise ValueError(f"{len(train_examples)} training prompts, fewer than the {prompts_per_step} prompts per "
                             f"step (train_batch_size / num_generations)")
        reward_functions = [(name, get_reward_factory(name)(cfg)) for name in cfg.reward_funcs]
        tokenizer = load_tokenizer(cfg)
        prompt_texts = [render_prompt(tokenizer, e.prompt) for e in train_examples]
        all_prompt_ids, num_truncated = truncate_prompts(
            [tokenizer(text, add_special_tokens=False).input_ids for text in prompt_texts], cfg.max_prompt_length,
            on_overflow=cfg.prompt_overflow)
        # >>> teacher run: student checks (loads, tokenizer, rlt's columns) before any model loads
        teacher = TeacherRun.prepare(cfg, reward_functions, train_examples, tokenizer) if cfg.trainer_args else None
    if num_truncated:
        logger.warning("%d of %d prompts are longer than max_prompt_length=%d tokens: their start is cut off "
                       "(set prompt_overflow=error to stop instead)", num_truncated, len(all_prompt_ids),
                       cfg.max_prompt_length)
    rounds_per_epoch = len(train_examples) // prompts_per_step
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(
        1, math.ceil(rounds_per_epoch * cfg.num_train_epochs) * cfg.num_iterations)
    # locked, config.yaml written, stale metrics rows dropped; the lock is held until the process exits
    run_dir = claim_output_dir(cfg, resume_path, resumed_step(resume_path), accelerator.is_main_process)
    logger.info("%d train prompts, %d eval, %d prompts x %d completions per step, %d steps", len(train_examples),
                len(eval_examples), prompts_per_step, group, total_steps)

    def combined_reward(inputs: list) -> list:
        rewards = weighted_rewards(score_rollouts(reward_functions, inputs), cfg.reward_weights)
        return [None if math.isnan(r) else float(r) for r in rewards.tolist()]

    # ----- models ----------------------------------------------------------------------------------------------------
    model = load_causal_lm(cfg, use_bf16=use_bf16)
    reference = None
    if (cfg.beta != 0 or needs_reference_model(cfg)) and not cfg.use_peft:
        reference = load_causal_lm(cfg, cfg.ref_model_name_or_path or cfg.model_name_or_path, use_bf16=use_bf16,
                                   trainable=False)
    student = None   # >>> teacher run: a student model of its own (frozen, never updated)
    if teacher is not None and cfg.student_model is not None and not is_api_student(cfg.student_model):
        student = load_causal_lm(cfg, cfg.student_model, use_bf16=use_bf16, trainable=False)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # after prepare: DeepSpeed may regroup the parameters, and the schedule must drive the groups it steps
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    if reference is not None:
        reference = prepare_frozen_model(accelerator, reference)
    if student is not None:
        student = prepare_frozen_model(accelerator, student)

    start_step = 0
    if resume_path is not None:
        start_step = load_checkpoint(accelerator, resume_path)["step"]
        if reference is not None and cfg.sync_ref_model and (resume_path / "ref_model").is_dir():
            synced = load_causal_lm(cfg, str(resume_path / "ref_model"), use_bf16=use_bf16, trainable=False)
            accelerator.unwrap_model(reference).load_state_dict(synced.state_dict())
        logger.info("resumed from %s at step %d", resume_path, start_step)
    tracker = Tracker(cfg, accelerator.is_main_process, config_to_dict(cfg), total_steps, resume=start_step > 0)
    preemption = PreemptionFlag(cfg.output_dir, accelerator.is_main_process)
    nonfinite = NonFiniteCounter(cfg.max_consecutive_nonfinite)
    if cfg.use_vllm_server:   # vLLM's own server(s), synced with the training weights (resumed ones too)
        from common.vllm_server import server_options
        engine = make_engine("server", **server_options(cfg, tokenizer, accelerator))
    elif cfg.use_vllm:   # loaded from the policy's path, then synced with the training weights (resumed ones too)
        engine = make_engine("vllm", model_path=cfg.model_name_or_path, tokenizer=tokenizer, accelerator=accelerator,
                             **vllm_options(cfg, use_bf16))
    else:
        engine = HFGenerateEngine(model, tokenizer, accelerator=accelerator, batch_size=cfg.generation_batch_size,
                                  share_prompt_prefill=cfg.share_prompt_prefix)
    with checkpoint_on_server_failure(accelerator, model, tokenizer, cfg, 0, {}):
        weights_version = engine.sync_weights(model, version=start_step)   # = the optimizer step of the weights
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                              repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_completion_length,
                              num_generations=group)
    logprob_temperature = cfg.temperature if cfg.unbias_log_probabilities and cfg.temperature > 0 else 1.0
    if teacher is not None:   # >>> teacher run: the student's engine and the episode loop on the loaded models
        teacher.connect(accelerator, model, reference, student, engine, tokenizer, reward_functions)

    # Shared-prompt forwards (share_prompt_prefix): the cache keyword of each model, or None to run rows in full.
    policy_cache_arg = cache_argument(accelerator.unwrap_model(model)) if cfg.share_prompt_prefix else None
    reference_cache_arg = cache_argument(accelerator.unwrap_model(reference)) \
        if reference is not None and cfg.share_prompt_prefix else None   # a separate, never-checkpointed model
    if cfg.share_prompt_prefix and policy_cache_arg is None:
        logger.warning("share_prompt_prefix: the model's forward takes no KV cache; every row runs in full")
    train_cache_arg = None if cfg.gradient_checkpointing else policy_cache_arg   # checkpointed layers drop caches
    # logprobs_from_hidden: each model's lm_head, kept after a check on the first batch (verified_head)
    policy_head = plain_lm_head(accelerator.unwrap_model(model)) if cfg.logprobs_from_hidden else None
    reference_head = policy_head if reference is None else (
        plain_lm_head(accelerator.unwrap_model(reference)) if cfg.logprobs_from_hidden else None)
    heads_checked = False

    def verified_head(net, head, batch: dict, cache_arg: Optional[str], name: str):
        if head is None:
            if cfg.logprobs_from_hidden:
                logger.warning("logprobs_from_hidden: the %s has no plain bias-free lm_head; using its logits", name)
            return None
        agree = lm_head_logprobs_agree(accelerator.unwrap_model(net), head, batch, logprob_temperature, cache_arg)
        # every process must take the same path (ZeRO-3 runs the forwards together)
        disagree = accelerator.reduce(torch.tensor(float(not agree), device=accelerator.device), "max").item()
        if disagree:
            logger.warning("logprobs_from_hidden: the %s's logprobs through lm_head differ from those through its "
                           "logits (a transform after lm_head, such as softcapping or scaling?); using its logits", name)
            return None
        return head

    def reference_logprobs(batch: dict) -> Optional[torch.Tensor]:
        if cfg.beta == 0:
            return None
        with torch.no_grad():
            if reference is not None:
                return completion_logprobs(reference, batch, logprob_temperature, reference_cache_arg, reference_head)
            with accelerator.unwrap_model(model).disable_adapter():  # PEFT: the base model is the reference
                return completion_logprobs(model, batch, logprob_temperature, train_cache_arg, policy_head)

    def evaluate(step: int) -> dict:
        if teacher is not None:   # >>> teacher run: greedy teacher, greedy student, with and without the teaching
            result = teacher.loop.evaluate(accelerator, eval_examples[:cfg.eval_max_samples], cfg.max_completion_length,
                                           batch_size=cfg.per_device_eval_batch_size * 8)
            tracker.log({"eval/teacher/student_accuracy": result["student_accuracy"],
                         "eval/teacher/baseline_accuracy": result["baseline_accuracy"],
                         "eval/num_samples": result["num_scored"]}, step)
            return result
        result = greedy_eval(accelerator, model, tokenizer, eval_examples, combined_reward, cfg.max_completion_length,
                             cfg.eval_max_samples, batch_size=cfg.per_device_eval_batch_size * 8,
                             engine=engine if cfg.use_vllm or cfg.use_vllm_server else None)
        metrics = {"eval/reward": result["accuracy"], "eval/num_samples": result["num_scored"]}
        tracker.log(metrics, step)
        return result

    start_eval = evaluate(start_step) if cfg.eval_on_start and eval_examples and cfg.do_eval else None

    # ----- train -----------------------------------------------------------------------------------------------------
    model.train()
    micro_batches: list[dict] = []
    fresh_rollouts = False
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        step_start = time.time()
        metrics: dict[str, float] = {}
        if (step - 1) % cfg.num_iterations == 0 or not micro_batches:
            # ----- rollout ---------------------------------------------------------------------------------------
            generation_round = (step - 1) // cfg.num_iterations
            epoch, round_in_epoch = divmod(generation_round, rounds_per_epoch)
            prompt_indices = global_batches(len(train_examples), prompts_per_step, cfg.seed, epoch,
                                            cfg.shuffle_generation_inputs)[round_in_epoch]
            local_indices = shard(prompt_indices, rank, world)
            # a server down: checkpoint of the weights so far, then stop
            with checkpoint_on_server_failure(accelerator, model, tokenizer, cfg, step - 1,
                                              {"generation_round": (step - 1) // cfg.num_iterations}):
                if teacher is not None:   # >>> teacher run: episodes; the rollouts' prompts are the teacher prompts
                    episodes = teacher.loop.run([train_examples[i] for i in local_indices], sampling, step)
                    rollouts = episodes.rollouts
                else:
                    with finite_sampling(accelerator, step, model):
                        rollouts = engine.generate([all_prompt_ids[i] for i in local_indices], sampling)  # prompts x G
            generate_seconds = time.time() - step_start
            stale = sorted({r.weights_version for r in rollouts} - {weights_version})
            if stale:
                raise RuntimeError(f"step {step}: rollouts sampled with weights version(s) {stale}, the policy's is "
                                   f"{weights_version} (a weight sync was missed)")
            fresh_rollouts = True   # sampled by the weights the first update of this batch starts from

            # ----- reward ----------------------------------------------------------------------------------------
            reward_start = time.time()
            sources = [local_indices[r.prompt_index] for r in rollouts]
            inputs = build_reward_inputs([train_examples[i] for i in sources], [r.completion_text for r in rollouts],
                                         [prompt_texts[i] for i in sources]) if teacher is None else episodes.inputs
            per_function = score_rollouts(reward_functions, inputs)                       # [N_local, F]
            if teacher is not None:   # >>> a sample whose student call failed is unscored, never wrong
                per_function = teacher.mask_failed(per_function, episodes)
            all_per_function = accelerator.gather(per_function.to(accelerator.device)).cpu()   # [N, F]
            all_rewards = weighted_rewards(all_per_function, cfg.reward_weights)         # [N]
            advantages, reward_stats = group_advantages(all_rewards, group, cfg.scale_rewards)
            local_advantages = advantages.view(world, -1)[rank]                          # this rank's groups
            reward_seconds = time.time() - reward_start
            for f, (name, function) in enumerate(reward_functions):
                column = all_per_function[:, f]
                metrics[f"rewards/{name}/mean"] = column.nanmean().item()
                metrics[f"rewards/{name}/std"] = column[~column.isnan()].std().item() if (~column.isnan()).sum() > 1 \
                    else 0.0
                if hasattr(function, "pop_metrics"):
                    metrics.update(function.pop_metrics())
            metrics.update({"reward": reward_stats["reward_mean"], "reward_std": reward_stats["reward_std"],
                            "frac_reward_none": reward_stats["frac_reward_none"],
                            "frac_zero_std_groups": reward_stats["frac_zero_std_groups"]})
            lengths = torch.tensor([float(len(r.completion_ids)) for r in rollouts], device=accelerator.device)
            truncated = torch.tensor([float(r.finish_reason == "length") for r in rollouts], device=accelerator.device)
            all_lengths, all_truncated = accelerator.gather(lengths), accelerator.gather(truncated)
            metrics.update({"completions/mean_length": all_lengths.mean().item(),
                            "completions/max_length": all_lengths.max().item(),
                            "completions/truncated_frac": all_truncated.mean().item(),
                            "time/generate": generate_seconds, "time/reward": reward_seconds,
                            "rollout/weights_version": float(weights_version),
                            "rollout/tokens_per_second": all_lengths.sum().item() / max(generate_seconds, 1e-9)})
            if cfg.log_completions:
                picker = random.Random(cfg.seed * 1_000_003 + step)
                rows = [{"prompt": inp.prompt, "completion": inp.completion, "ground_truth": inp.ground_truth,
                         "reward": None if math.isnan(float(all_rewards.view(world, -1)[rank][i])) else
                         float(all_rewards.view(world, -1)[rank][i]), "advantage": float(local_advantages[i])}
                        for i, inp in enumerate(inputs) if picker.random() < cfg.logging_prob]
                tracker.log_completions(gather_object(rows), step)
            if teacher is not None:   # >>> teacher metrics and the sampled episodes, whole
                metrics.update(teacher.step_metrics(accelerator, episodes))
                local_rewards = all_rewards.view(world, -1)[rank]
                local_per_function = all_per_function.view(world, -1, len(reward_functions))[rank]
                teacher.log_episodes(accelerator, episodes, local_rewards.tolist(), local_advantages.tolist(),
                                     {name: local_per_function[:, f].tolist()
                                      for f, (name, _) in enumerate(reward_functions)}, step)

            # ----- old and reference logprobs, once per generation batch -----------------------------------------
            micro_batches = []
            for start in range(0, len(rollouts), cfg.per_device_train_batch_size):
                chunk = rollouts[start: start + cfg.per_device_train_batch_size]
                batch = rollout_batch(chunk, tokenizer.pad_token_id, cfg.mask_truncated_completions,
                                      share_prompts=cfg.share_prompt_prefix)
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch["advantages"] = local_advantages[start: start + len(chunk)].to(accelerator.device)
                batch["engine_logps"], batch["engine_mask"] = engine_logprobs(chunk, batch["completion_width"],
                                                                              accelerator.device)
                if not heads_checked:
                    policy_head = verified_head(model, policy_head, batch, train_cache_arg, "policy")
                    if reference is not None and cfg.beta != 0:
                        reference_head = verified_head(reference, reference_head, batch, reference_cache_arg,
                                                       "reference model")
                    else:
                        reference_head = policy_head
                    heads_checked = True
                with torch.no_grad():
                    # the same forward as the update's, so the first ratio is exactly 1
                    batch["old_logps"] = (completion_logprobs(model, batch, logprob_temperature, train_cache_arg,
                                                              policy_head)
                                          if cfg.num_iterations > 1 else None)
                batch["ref_logps"] = reference_logprobs(batch)
                micro_batches.append(batch)
            tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
            metrics["tokens"] = accelerator.reduce(torch.tensor(float(tokens), device=accelerator.device), "sum").item()

        # ----- update ----------------------------------------------------------------------------------------------
        train_start = time.time()
        local_items = sum(float(b["completion_mask"].sum()) for b in micro_batches)
        num_items = accelerator.reduce(torch.tensor(local_items, device=accelerator.device), "sum")
        # dapo divides by the step's global token count: undo accelerate's 1/accum and DDP's 1/world
        scale = accum * world if cfg.loss_type == "dapo" else 1.0
        sums = torch.zeros(5, device=accelerator.device)  # loss, kl, clip low, clip high, clip region
        diff_stats = torch.zeros(3, device=accelerator.device)  # |engine - trainer| logprob sum, tokens, max
        measure_diff = fresh_rollouts and sampling.temperature == logprob_temperature
        fresh_rollouts = False
        for batch in micro_batches:
            with accelerator.accumulate(model):
                logps = completion_logprobs(model, batch, logprob_temperature, train_cache_arg, policy_head)  # [B, C]
                loss, loss_metrics = grpo_loss(
                    logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], batch["completion_mask"],
                    loss_type=cfg.loss_type, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                    beta=cfg.beta, max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items)
                accelerator.backward(loss * scale)
            if measure_diff and batch["engine_logps"] is not None:
                diff = (logps.detach() - batch["engine_logps"]).abs() * batch["engine_mask"]       # [B, C]
                diff_stats[:2] += torch.stack([diff.sum(), batch["engine_mask"].sum()]).float()
                diff_stats[2] = torch.maximum(diff_stats[2], diff.max().float())
            sums += torch.stack([loss.detach() * scale / accum, loss_metrics.get("kl", torch.zeros(())).detach(),
                                 loss_metrics["clip_ratio/low"], loss_metrics["clip_ratio/high"],
                                 loss_metrics["clip_ratio/region"]]).to(sums.device)
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, sums[0], nonfinite,
                                   step)
        sync_start = time.time()
        with checkpoint_on_server_failure(accelerator, model, tokenizer, cfg, step,
                                          {"generation_round": step // cfg.num_iterations}):
            weights_version = engine.sync_weights(model, version=step)   # the next rollouts sample these weights
        metrics["time/weight_sync"] = time.time() - sync_start
        if cfg.use_vllm_server:   # the packer's figures: buckets, megabytes, GB/s
            metrics.update(engine.sync_metrics())
        if reference is not None and cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
            sync_reference(accelerator, model, reference, cfg.ref_model_mixup_alpha)

        # ----- log -------------------------------------------------------------------------------------------------
        totals = accelerator.reduce(sums, reduction="mean")
        elapsed = time.time() - step_start
        metrics.update({"loss": totals[0].item(),
                        "clip_ratio/low": totals[2].item() / len(micro_batches),
                        "clip_ratio/high": totals[3].item() / len(micro_batches),
                        "clip_ratio/region": totals[4].item() / len(micro_batches),
                        **step_metrics(grad_norm, nonfinite),
                        "lr": scheduler.get_last_lr()[0], "time/train": time.time() - train_start,
                        "step_seconds": elapsed})
        if teacher is not None:
            metrics["time/update"] = metrics["time/train"]
        if cfg.beta != 0:
            metrics["kl"] = totals[1].item() / len(micro_batches)
        if measure_diff:
            diff_sum, diff_tokens = accelerator.reduce(diff_stats[:2], reduction="sum").tolist()
            diff_max = accelerator.reduce(diff_stats[2:], reduction="max").item()
            if diff_tokens:
                metrics.update({"rollout/logprob_diff_mean": diff_sum / diff_tokens,
                                "rollout/logprob_diff_max": diff_max})
        if "tokens" in metrics:
            metrics["tokens_per_second"] = metrics.pop("tokens") / max(elapsed, 1e-9)
        if step % cfg.logging_steps == 0 or step == total_steps or grad_norm == SKIPPED:
            tracker.log(metrics, step)
        if cfg.do_eval and eval_examples and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step != total_steps:
            evaluate(step)

        # ----- checkpoint ------------------------------------------------------------------------------------------
        extra = {"ref_model": reference} if reference is not None and cfg.sync_ref_model else None
        if checkpoint_or_stop(accelerator, preemption, model, tokenizer, cfg, step,
                              {"generation_round": step // cfg.num_iterations}, extra_models=extra):
            engine.close()
            tracker.close()
            return

    # ----- final save and eval ---------------------------------------------------------------------------------------
    ensure_finite_weights(accelerator, step, model)
    save_model(accelerator, model, tokenizer, Path(cfg.output_dir))
    if cfg.push_to_hub:
        push_final_model(accelerator, cfg.output_dir, cfg.hub_model_id)
    if cfg.do_eval and eval_examples:
        final_eval = evaluate(step)
        if accelerator.is_main_process and teacher is not None:
            rows = ([("start", start_eval)] if start_eval else []) + [(f"GRPO ({cfg.output_dir}, step {step})", final_eval)]
            print(format_teacher_table(rows), flush=True)
        elif accelerator.is_main_process:
            from common.evaluation import format_accuracy_table, start_rows
            rows = start_rows(cfg.output_dir, cfg.model_name_or_path, start_step, start_eval) + [
                (f"GRPO ({cfg.output_dir}, step {step})", final_eval)]
            print(format_accuracy_table(rows), flush=True)
    engine.close()
    tracker.close()
    accelerator.end_training()


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
