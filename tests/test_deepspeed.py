"""The three scripts under DeepSpeed ZeRO-3 on 2 CPU processes: sharded training, frozen reference / teacher
models sharded for inference, generation with gathered weights, and Hugging Face-format saves."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import deepspeed_launch, side_by_side


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_zero3_trains_and_saves_full_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    assert_ok(deepspeed_launch(
        ["train_sft.py", "--config", "configs/recipe/quickstart_sft.yaml", f"model_name_or_path={tiny_model_dir}",
         f"output_dir={out}", "make_dataset_fn.num_samples=200", "max_steps=3", "train_batch_size=8",
         "per_device_train_batch_size=2", "save_steps=3", "eval_generation_reward=arithmetic",
         "eval_generation_samples=8", "logging_steps=1"], zero_stage=3))
    assert len(losses(out)) == 3
    saved = load_file(out / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}  # gathered, not shards
    assert any(not torch.equal(saved[k], original[k]) for k in saved)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()


def test_grpo_zero3_with_sharded_reference(tiny_model_dir, tmp_path):
    """ZeRO-3 with a sharded reference; the lm_head-logprob path (gathered weight inside lm_head's forward)
    gives the same losses as the logits path."""
    def launch(from_hidden: str):
        return deepspeed_launch(
            ["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml", f"model_name_or_path={tiny_model_dir}",
             f"output_dir={tmp_path / f'grpo_{from_hidden}'}", "make_dataset_fn.num_samples=200", "max_steps=2",
             "train_batch_size=32", "per_device_train_batch_size=8", "num_generations=8", "beta=0.04",
             "max_completion_length=6", "eval_on_start=false", "do_eval=false", "logging_steps=1",
             f"logprobs_from_hidden={from_hidden}"], zero_stage=3)

    runs = {}
    for from_hidden, result in zip(("true", "false"), side_by_side(lambda: launch("true"), lambda: launch("false"))):
        out = tmp_path / f"grpo_{from_hidden}"
        assert_ok(result)
        assert "logprobs_from_hidden:" not in result.stderr   # the first-batch check passed on both models
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[from_hidden] = [r for r in rows if "loss" in r]
    assert [r["step"] for r in runs["true"]] == [1, 2]
    assert all(r["kl"] >= 0 for r in runs["true"])
    for found, expected in zip(runs["true"], runs["false"]):
        assert found["reward"] == expected["reward"]
        assert found["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        assert found["kl"] == pytest.approx(expected["kl"], abs=1e-5)


def test_gkd_zero3_with_sharded_teacher(tiny_model_dir, tmp_path):
    out = tmp_path / "gkd"
    assert_ok(deepspeed_launch(
        ["train_gkd.py", "--config", "configs/recipe/quickstart_gkd.yaml", f"model_name_or_path={tiny_model_dir}",
         f"teacher_model_name_or_path={tiny_model_dir}", f"output_dir={out}", "make_dataset_fn.num_samples=200",
         "max_steps=2", "train_batch_size=8", "per_device_train_batch_size=2", "lmbda=1.0", "max_new_tokens=4",
         "eval_generation_reward=null", "do_eval=false", "logging_steps=1"], zero_stage=3))
    assert len(losses(out)) == 2
