"""Experiment trackers and plotting: wandb (offline) and tensorboard get the metrics, never the secrets."""
from __future__ import annotations

import json

from conftest import run_python


def test_wandb_and_tensorboard_receive_metrics_but_no_secrets(tiny_model_dir, tmp_path):
    out = tmp_path / "tracked"
    secret = "sk-test-0123456789abcdef"
    result = run_python(
        ["train_sft.py", "--config", "configs/recipe/quickstart_sft.yaml", f"model_name_or_path={tiny_model_dir}",
         f"output_dir={out}", "make_dataset_fn.num_samples=100", "max_steps=2", "train_batch_size=8",
         "per_device_train_batch_size=8", "report_to=[wandb,tensorboard]", "save_steps=0",
         "eval_generation_reward=null", "system_prompt=${env:TRACKING_TEST_SECRET}",
         f"make_dataset_fn.api_key={secret}"],
        env={"WANDB_MODE": "offline", "TRACKING_TEST_SECRET": secret})
    assert result.returncode == 0, result.stderr[-4000:]
    wandb_files = [p for p in (out / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in wandb_files)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for path in [*wandb_files, out / "config.yaml", out / "metrics.jsonl"]:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr


def test_plot_metrics_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) for s in range(1, 6)) + "\n")
    result = run_python(["scripts/plot_metrics.py", str(metrics)])
    assert result.returncode == 0, result.stderr
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_python(["scripts/plot_metrics.py", str(metrics), "--keys", "reward"])
    assert bad.returncode != 0 and "none of the requested metrics" in bad.stderr


def test_progress_eta_is_unknown_until_a_step_is_timed(tmp_path, capsys, monkeypatch):
    import types

    from common import tracking
    clock = [100.0, 100.0, 130.0]   # construction, first logged step, 10 steps later (3 s a step)
    monkeypatch.setattr(tracking.time, "time", lambda: clock.pop(0) if len(clock) > 1 else clock[0])
    cfg = types.SimpleNamespace(output_dir=str(tmp_path), report_to=[])
    tracker = tracking.Tracker(cfg, is_main=True, config_dict={}, total_steps=50)
    tracker.log({"loss": 1.0}, step=10)
    tracker.log({"loss": 0.5}, step=20)
    tracker.close()
    first, second = capsys.readouterr().err.strip().splitlines()
    assert first.startswith("step 10/50") and first.endswith("eta ?")
    assert second.endswith("eta 00:01:30")   # 30 remaining steps x 3 s


def test_training_run_closes_tracker_engines_and_lock_when_the_loop_raises(tiny_model_dir, tmp_path):
    """The context manager closes what the run opened on every exit path: here an exception inside the loop."""
    import fcntl

    import pytest
    import torch
    from accelerate import Accelerator

    import train_sft
    from common.config import load_config
    from common.loop import claim_output_dir, training_run

    out = tmp_path / "raised"
    cfg = load_config(train_sft.Config, ["--config", "configs/recipe/quickstart_sft.yaml",
                                         f"model_name_or_path={tiny_model_dir}", f"output_dir={out}"])
    closed = []

    class Engine:
        def close(self):
            closed.append("engine")

    claimed = claim_output_dir(cfg, None, is_main=True)
    with pytest.raises(RuntimeError, match="inside the loop"):
        with training_run(cfg, Accelerator(cpu=True), torch.nn.Linear(4, 4), 3, None, claimed) as run:
            run.close_at_exit(Engine())
            run.tracker.log({"loss": 1.0}, 1)
            raise RuntimeError("inside the loop")
    assert closed == ["engine"]
    assert run.tracker._metrics_file.closed
    assert json.loads((out / "metrics.jsonl").read_text())["loss"] == 1.0
    with open(out / ".lock", "a+") as handle:   # released: another run may take it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
