"""Policy / reference / teacher / student loading: tokenizer, dtype, attention, PEFT, 4-bit, checkpointing."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, use_bf16: bool) -> torch.dtype | str:
    """`auto` follows the precision the run trains in (bf16 where supported, else float32)."""
    if name == "auto":
        return torch.bfloat16 if use_bf16 else torch.float32
    return DTYPES[name]


def resolve_attn_implementation(requested: Optional[str]) -> Optional[str]:
    """flash_attention_2 needs CUDA and the flash-attn package; otherwise fall back to sdpa and say so."""
    if requested == "flash_attention_2":
        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            logger.warning("attn_implementation=flash_attention_2 needs CUDA and `pip install flash-attn` "
                           "(requirements-gpu.txt); using sdpa instead")
            return "sdpa"
    return requested


def check_model_source(key: str, value: str) -> None:
    """A local model directory must exist; anything else must look like a hub id (and, offline, be cached)."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"key '{key}' = {value!r}: {path} has no config.json; expected a model "
                                    "directory saved with save_pretrained")
        return
    from common.config import is_missing_local_path
    if is_missing_local_path(value):
        raise FileNotFoundError(f"key '{key}' = {value!r}: no such local model directory (and not a hub id "
                                "`org/name`)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise FileNotFoundError(f"key '{key}' = {value!r}: not a local directory, and HF_HUB_OFFLINE is set "
                                    "but the hub model is not in the local cache")


def load_tokenizer(cfg, name_or_path: Optional[str] = None):
    from transformers import AutoTokenizer

    path = name_or_path or cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=cfg.unsafe_tokenizer_loading, padding_side=cfg.tokenizer.padding_side)
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        tokenizer.chat_template = template.read_text() if template.is_file() else cfg.chat_template
    if tokenizer.pad_token is None:
        # a pad token distinct from EOS when the vocabulary has one; EOS otherwise (masked out everywhere)
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {path} has no chat template; set `chat_template` (Jinja text or a file path)")
    return tokenizer


def load_causal_lm(cfg, name_or_path: Optional[str] = None, *, use_bf16: bool = False, trainable: bool = True,
                   gradient_checkpointing: Optional[bool] = None):
    """Load a causal LM as the config says. Trainable models get PEFT and gradient checkpointing if asked."""
    from transformers import AutoModelForCausalLM

    path = name_or_path or cfg.model_name_or_path
    kwargs = dict(
        dtype=resolve_dtype(cfg.torch_dtype, use_bf16),
        trust_remote_code=cfg.trust_remote_code,
    )
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if attn:
        kwargs["attn_implementation"] = attn
    if cfg.load_in_4bit:
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("load_in_4bit=true needs a CUDA GPU and `pip install bitsandbytes`")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad path from frozen embeddings
        model = get_peft_model(model, lora)
    return model


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def log_parameter_count(role: str, name: str, model) -> None:
    total, trainable = count_parameters(model)
    logger.info("%s %s: %.2fM parameters, %.2fM trainable", role, name, total / 1e6, trainable / 1e6)


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prepare_frozen_model(accelerator, model):
    """Place a frozen model (reference, teacher) for inference beside the trained one.

    Under DeepSpeed ZeRO-3 it is sharded like the policy (an inference engine without optimizer); under other
    DeepSpeed stages it is simply replicated. Call after `accelerator.prepare(policy, optimizer)`, which fills the
    DeepSpeed config's "auto" values. Under ZeRO-3 every rank must run the same number of forwards.
    """
    model.eval()
    model.requires_grad_(False)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return model.to(accelerator.device)
    import copy

    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if config.get("zero_optimization", {}).get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode for the block; each module's own training flag restored afterwards (some may be in
    eval on purpose, e.g. a frozen part)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.train(training)
