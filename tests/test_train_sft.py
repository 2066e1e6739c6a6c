"""train_sft.py end to end on a tiny model: learning, checkpoints, resume, accumulation invariance, 2 processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD, accelerate_launch, run_python, runs_per_case, side_by_side

RECIPE = "configs/recipe/quickstart_sft.yaml"


def sft_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train_sft.py", "--config", RECIPE, f"model_name_or_path={model_dir}", f"output_dir={output_dir}",
            "make_dataset_fn.num_samples=400", "make_dataset_fn.band_dropped_carry_rate=0",
            "eval_generation_reward=null", "logging_steps=1", "eval_steps=1000",
            "save_steps=0", *extra]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_sft_learns_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_python(sft_args(tiny_model_dir, out, "max_steps=40", "train_batch_size=32",
                                 "per_device_train_batch_size=32", "do_eval=true", "eval_steps=40"))
    assert_ok(result)
    losses = [row["loss"] for row in metrics(out) if "loss" in row]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert any("eval/loss" in row for row in metrics(out))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert (out / "config.yaml").is_file()


STRAIGHT = ["max_steps=4", "train_batch_size=4", "gradient_accumulation_steps=null", "learning_rate=1e-2",
            "save_steps=2", "save_total_limit=5"]


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two 4-step runs side by side, checkpoints at steps 2 and 4: 1 micro-batch of 4 ("accum1") and 4 accumulated
    micro-batches of 1 ("accum4"). The resume and accumulation tests read them."""
    root = tmp_path_factory.mktemp("sft_straight")
    runs = {"accum1": "per_device_train_batch_size=4", "accum4": "per_device_train_batch_size=1"}
    results = side_by_side(*[lambda name=name, batch=batch: run_python(
        sft_args(tiny_model_dir, root / name, *STRAIGHT, batch), env=ONE_THREAD) for name, batch in runs.items()])
    for result in results:
        assert_ok(result)
    return {name: root / name for name in runs}


def test_resume_continues_at_the_same_step_and_batch(straight_runs, tiny_model_dir, tmp_path):
    straight = straight_runs["accum1"]
    assert (straight / "checkpoint-2" / "trainer_state.json").is_file()
    assert (straight / "checkpoint-4").is_dir()
    assert not list(straight.glob("*.tmp"))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert_ok(run_python(sft_args(tiny_model_dir, resumed, *STRAIGHT, "per_device_train_batch_size=4",
                                  "resume_from_checkpoint=latest"), env=ONE_THREAD))
    rows = metrics(resumed)
    assert [r["step"] for r in rows if "loss" in r] == [3, 4]
    straight_losses = {r["step"]: r["loss"] for r in metrics(straight) if "loss" in r}
    for row in rows:
        if "loss" in row:  # the same next batch, the same weights -> the same loss
            assert row["loss"] == pytest.approx(straight_losses[row["step"]], rel=1e-5)
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_gradient_accumulation_invariance(straight_runs):
    """1 micro-batch x 4 accumulation steps == 4 x 1: same losses and weights."""
    one, four = straight_runs["accum4"], straight_runs["accum1"]
    losses_one = [r["loss"] for r in metrics(one) if "loss" in r]
    losses_four = [r["loss"] for r in metrics(four) if "loss" in r]
    assert len(losses_one) == 4 and losses_one == pytest.approx(losses_four, rel=1e-4)
    a, b = weights(one), weights(four)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_two_process_cpu_run_matches_one_process(tiny_model_dir, tmp_path):
    """A real 2-process run (gloo) trains, saves, and takes the same steps as one process on the same batches."""
    common = ["max_steps=3", "train_batch_size=8", "gradient_accumulation_steps=null", "learning_rate=1e-2",
              "per_device_train_batch_size=2"]
    two = tmp_path / "two"
    one = tmp_path / "one"
    for result in side_by_side(lambda: accelerate_launch(sft_args(tiny_model_dir, two, *common, "save_steps=3")),
                               lambda: run_python(sft_args(tiny_model_dir, one, *common), env=ONE_THREAD)):
        assert_ok(result)
    assert (two / "checkpoint-3" / "trainer_state.json").is_file()
    losses_two = [r["loss"] for r in metrics(two) if "loss" in r]
    losses_one = [r["loss"] for r in metrics(one) if "loss" in r]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    a, b = weights(two), weights(one)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


BAD_CONFIG = [
    (["learnig_rate=1e-3"], "unknown key 'learnig_rate'.*did you mean 'learning_rate'"),
    (["train_batch_size=10", "per_device_train_batch_size=4", "gradient_accumulation_steps=null"], "not divisible"),
    (["load_in_4bit=true"], "load_in_4bit"),
]


@pytest.fixture(scope="module")
def bad_config_runs(tiny_model_dir, tmp_path_factory) -> dict:
    """One run per BAD_CONFIG case, side by side: the case's overrides (a tuple) -> (output_dir, result)."""
    return runs_per_case(BAD_CONFIG, lambda out, *extra: sft_args(tiny_model_dir, out, *extra),
                         tmp_path_factory.mktemp("sft_bad_config"))


@pytest.mark.parametrize("extra,message", BAD_CONFIG)
def test_bad_config_fails_before_anything_is_written(bad_config_runs, extra, message):
    out, result = bad_config_runs[tuple(extra)]
    assert result.returncode != 0
    assert __import__("re").search(message, result.stderr), result.stderr[-2000:]
    assert not out.exists()


def test_bad_data_fails_before_models_load(tmp_path):
    """Malformed JSONL is reported with file and line although the model path does not even exist."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": \n')
    out = tmp_path / "never"
    result = run_python(["train_sft.py", "--config", RECIPE, f"model_name_or_path={tmp_path / 'no_model'}",
                         f"output_dir={out}", f"dataset_id_or_path={data}", "make_dataset_fn={}"])
    assert result.returncode != 0
    assert "d.jsonl:2: malformed JSON" in result.stderr
    assert not out.exists()


def test_missing_preset_file_is_one_clear_error(tmp_path):
    result = run_python(["train_sft.py", "--config", str(tmp_path / "missing.yaml")])
    assert result.returncode != 0 and "config file not found" in result.stderr
    assert result.stderr.count("Traceback") == 0


@pytest.mark.parametrize("how", ["sigterm", "stop_file"])
def test_preemption_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path, how):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / how
    args = sft_args(tiny_model_dir, out, "max_steps=100000", "train_batch_size=8", "per_device_train_batch_size=8",
                    "save_steps=0")
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in process.stderr:
        if line.startswith("step 3/"):
            if how == "sigterm":
                process.send_signal(signal.SIGTERM)
            else:
                (out / "STOP").touch()
            break
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 0, rest[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 100000
    assert not (out / "model.safetensors").exists()  # stopped before the end: no final save
    assert not list(out.glob("*.tmp"))
