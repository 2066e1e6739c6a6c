"""Non-finite steps in all three scripts: skipped and counted, stop after max_consecutive_nonfinite in a row,
never saving non-finite weights; sampling from non-finite weights is the same clear stop."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ONE_THREAD, run_python, side_by_side
from common.loop import FORCE_NONFINITE_ENV


def script_args(script: str, model: Path, out: Path, *extra: str, teacher: Path | None = None) -> list[str]:
    common = [f"model_name_or_path={model}", f"output_dir={out}", "logging_steps=1", "save_steps=1",
              "save_total_limit=10", *extra]
    if script == "sft":
        return ["train_sft.py", "--config", "configs/recipe/quickstart_sft.yaml", "make_dataset_fn.num_samples=100",
                "train_batch_size=8", "per_device_train_batch_size=8", "eval_generation_reward=null", "do_eval=false",
                *common]
    if script == "grpo":
        return ["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml", "make_dataset_fn.num_samples=100",
                "reward_funcs=[format]", r"format_pattern=\d.*", "max_completion_length=4", "train_batch_size=16",
                "per_device_train_batch_size=16", "num_generations=4", "eval_on_start=false", "do_eval=false",
                "beta=0", *common]
    return ["train_gkd.py", "--config", "configs/recipe/quickstart_gkd.yaml",
            f"teacher_model_name_or_path={teacher or model}",
            "make_dataset_fn.num_samples=100", "train_batch_size=8", "per_device_train_batch_size=8", "lmbda=0",
            "eval_generation_reward=null", "do_eval=false", *common]


def rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """Other random weights than the student's: GKD against itself would have zero gradients."""
    from make_tiny_model import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", hidden_size=64, layers=2, heads=4, seed=1)


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN in its final norm: every forward is NaN."""
    directory = tmp_path_factory.mktemp("models") / "nan"
    shutil.copytree(tiny_model_dir, directory)
    state = load_file(directory / "model.safetensors")
    name = next(k for k in state if k.endswith("norm.weight") and "layers" not in k)
    state[name][0] = float("nan")
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def runs(tiny_model_dir, teacher_dir, nan_model_dir, tmp_path_factory) -> dict:
    """The five runs of the tests below side by side, name -> (output_dir, result): each script with forced non-finite
    steps 2, 4, 5, 6 ("sft", "grpo", "gkd"), and SFT / GRPO on NaN weights ("nan_sft", "nan_grpo")."""
    root = tmp_path_factory.mktemp("nonfinite")
    launches = {script: (script_args(script, tiny_model_dir, root / script, "max_steps=8", "max_consecutive_nonfinite=3",
                                     teacher=teacher_dir), {FORCE_NONFINITE_ENV: "2,4,5,6"})
                for script in ("sft", "grpo", "gkd")}
    launches["nan_sft"] = (script_args("sft", nan_model_dir, root / "nan_sft", "max_steps=6", "save_steps=0"), {})
    launches["nan_grpo"] = (script_args("grpo", nan_model_dir, root / "nan_grpo", "max_steps=2"), {})
    results = side_by_side(*[lambda args=args, env=env: run_python(args, env={**ONE_THREAD, **env})
                             for args, env in launches.values()])
    return {name: (root / name, result) for name, result in zip(launches, results)}


@pytest.mark.parametrize("script", ["sft", "grpo", "gkd"])
def test_nonfinite_steps_are_skipped_counted_shown_and_stop_the_run_in_a_row(script, runs):
    out, result = runs[script]
    assert result.returncode != 0
    assert "NonFiniteError: step 6: 3 non-finite steps in a row (max_consecutive_nonfinite=3)" in result.stderr
    metrics = rows(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5]  # the stopping step raises before it logs
    assert [metrics[s].get("step_skipped") for s in range(1, 6)] == [None, True, False, True, True]
    assert [metrics[s].get("nonfinite_steps") for s in range(2, 6)] == [1, 1, 2, 3]
    assert all(isinstance(metrics[s]["loss"], float) for s in metrics)  # never a silent null
    assert metrics[1]["lr"] == metrics[2]["lr"]  # the schedule did not advance on the skipped step
    assert "optimizer step SKIPPED (non-finite) | nonfinite_steps 1" in result.stderr
    # nothing stepped on skipped steps: checkpoint-2 holds step 1's weights, 4 and 5 hold step 3's
    assert same_weights(out / "checkpoint-1", out / "checkpoint-2")
    assert not same_weights(out / "checkpoint-2", out / "checkpoint-3")
    assert same_weights(out / "checkpoint-3", out / "checkpoint-5")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 6)]
    assert not (out / "model.safetensors").exists()  # no final model from a stopped run


def test_sft_on_nan_weights_stops_after_the_limit_and_writes_no_checkpoint(runs):
    out, result = runs["nan_sft"]
    assert result.returncode != 0
    assert "step 3: 3 non-finite steps in a row (max_consecutive_nonfinite=3)" in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    assert [(r["loss"], r["step_skipped"]) for r in rows(out).values()] == [("nan", True)] * 2


def test_grpo_sampling_on_nan_weights_is_a_clear_stop(runs):
    out, result = runs["nan_grpo"]
    assert result.returncode != 0
    assert "NonFiniteError: step 1: the model's weights contain NaN or inf" in result.stderr
    assert "probability tensor" not in result.stderr
    assert not list(out.glob("checkpoint-*"))
