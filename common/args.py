"""Keys every script shares: model, data and trainer basics, with the spec's defaults.

Each script's `Config` inherits these and adds its own keys. A shipped YAML key must be a field here or in a
script's `Config` (tests/test_configs.py resolves every shipped YAML).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class TokenizerArgs:
    padding_side: Literal["left", "right"] = "left"  # left keeps RL rollouts aligned at the generation start


@dataclass
class LoraArgs:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelArgs:
    model_name_or_path: Optional[str] = None                # required
    tokenizer_name_or_path: Optional[str] = None            # None -> model_name_or_path
    trust_remote_code: bool = False                         # spec says true; false is the safe default (README)
    unsafe_tokenizer_loading: bool = False                  # allow tokenizer code from the checkpoint to run
    use_peft: bool = False
    lora: LoraArgs = field(default_factory=LoraArgs)
    load_in_4bit: bool = False
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Optional[str] = "sdpa"             # flash_attention_2 falls back to sdpa if not installed
    chat_template: Optional[str] = None                     # Jinja text or a file path; overrides the tokenizer's


@dataclass
class DataArgs:
    dataset_id_or_path: Optional[str] = None                # hub id, local dir or .jsonl/.json(.gz) file
    dataset_config: Optional[str] = None                    # hub dataset config name
    dataset_split: str = "train"
    dataset_level_filter: Optional[str] = None              # e.g. level_4_5 keeps rows whose `level` is 4 or 5
    dataset_max_samples: Optional[int] = None
    eval_split_ratio: float = 0.1
    shuffle: bool = True
    completion_only_training: bool = True
    dataset_path: Optional[str] = None                      # file read by a make_dataset_fn (runtime traces)
    make_dataset_fn: dict = field(default_factory=dict)     # {_target_: module.fn, **kwargs}; called fn(cfg, **kwargs)
    system_prompt: Optional[str] = None


@dataclass
class TrainerArgs:
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False                      # a new run may replace another run's checkpoints/metrics
    run_name: Optional[str] = None
    seed: int = 42
    max_steps: int = 450                                    # > 0 wins over num_train_epochs
    num_train_epochs: float = 1
    train_batch_size: Optional[int] = 64                    # across all devices and accumulation steps
    per_device_train_batch_size: Optional[int] = 2
    gradient_accumulation_steps: Optional[int] = None       # inferred from the other two
    per_device_eval_batch_size: int = 8
    gradient_checkpointing: bool = True
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0                              # 0 = no clipping (the norm is still measured)
    max_consecutive_nonfinite: int = 3                      # NaN/inf steps in a row (each skipped) before the run stops
    lr_scheduler_type: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = 0.03
    bf16: bool = True                                       # used only where the hardware supports it
    tf32: bool = True
    ddp_timeout: int = 18000
    do_eval: bool = True
    eval_steps: int = 100
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: Optional[int] = 2                     # null = keep every checkpoint
    resume_from_checkpoint: Optional[str] = None            # a checkpoint path or "latest"
    report_to: list[str] = field(default_factory=list)      # wandb, tensorboard; console and JSONL always
    wandb_project: Optional[str] = None
    push_to_hub: bool = False                               # upload the final model (private repo)
    hub_model_id: Optional[str] = None
    activate_debugging_logs: bool = False


@dataclass
class CommonArgs(TrainerArgs, DataArgs, ModelArgs):
    """Base of every script's Config."""

    # Checked by common/config.py before anything loads; null passes where the type allows it.
    RANGES = {
        "lora.r": "[1, inf)", "lora.alpha": "(0, inf)", "lora.dropout": "[0, 1)",
        "dataset_max_samples": "[1, inf)", "eval_split_ratio": "[0, 1)",
        "seed": "[0, 4294967295]", "max_steps": "[-1, inf)", "num_train_epochs": "[0, inf)",
        "train_batch_size": "[1, inf)", "per_device_train_batch_size": "[1, inf)",
        "gradient_accumulation_steps": "[1, inf)", "per_device_eval_batch_size": "[1, inf)",
        "learning_rate": "(0, inf)", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
        "adam_epsilon": "(0, inf)", "max_grad_norm": "[0, inf)", "max_consecutive_nonfinite": "[1, inf)",
        "warmup_ratio": "[0, 1]", "ddp_timeout": "[1, inf)", "eval_steps": "[1, inf) if do_eval",
        "logging_steps": "[1, inf)", "save_steps": "[0, inf)", "save_total_limit": "[1, inf)",
    }
    # A resume refuses a checkpoint trained with other values of these (each script adds its algorithm's keys).
    RESUME_MUST_MATCH = ("model_name_or_path", "use_peft", "lora", "train_batch_size", "seed", "dataset_id_or_path",
                         "make_dataset_fn", "completion_only_training")

    def validate(self) -> None:
        """Checks that need no model; scripts extend this with their own."""
        from common.config import ConfigError
        if self.model_name_or_path is None:
            raise ConfigError("key 'model_name_or_path' is required (set it in a model preset or on the command line)")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub=true needs hub_model_id (e.g. my-org/teacher-sft)")
        unknown = set(self.report_to) - {"wandb", "tensorboard", "none"}
        if unknown:
            raise ConfigError(f"key 'report_to' has {sorted(unknown)}: expected a list of wandb, tensorboard")
        if self.load_in_4bit:
            import torch
            if not torch.cuda.is_available():
                raise ConfigError("key 'load_in_4bit' = true needs a CUDA GPU and bitsandbytes; none is available here")
