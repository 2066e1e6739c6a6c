"""A planted secret (an ${env:...} value, a URL password, a secret query parameter) appears in no file a run
writes, not on the console, not in the trackers; nothing is written before the start-up checks pass."""
from __future__ import annotations


import pytest

from common.config import load_config, redact_text
from conftest import run_python

SECRET = "sk-planted-0123456789"


@pytest.mark.parametrize("text,expected", [
    (f"http://user:{SECRET}@host:8000/v1", "http://user:<redacted>@host:8000/v1"),
    (f"https://host/v1?api-key={SECRET}&model=x", "https://host/v1?api-key=<redacted>&model=x"),
    (f"https://host/v1?x=1&token={SECRET}", "https://host/v1?x=1&token=<redacted>"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
])
def test_urls_lose_their_credentials(text, expected):
    assert redact_text(text) == expected


def test_every_file_of_a_run_the_console_and_the_trackers_hide_a_planted_secret(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_python(
        ["train_sft.py", "--config", "configs/recipe/quickstart_sft.yaml", f"model_name_or_path={tiny_model_dir}",
         f"output_dir={out}", "make_dataset_fn.num_samples=100", "max_steps=2", "train_batch_size=8",
         "per_device_train_batch_size=8", "report_to=[wandb,tensorboard]", "save_steps=1",
         "eval_generation_reward=null", "system_prompt=${env:PLANTED_SECRET}",
         f"make_dataset_fn.judge_url=http://user:{SECRET}x@host/v1", f"make_dataset_fn.query=h/?api-key={SECRET}y"],
        env={"WANDB_MODE": "offline", "PLANTED_SECRET": SECRET + "z"})
    assert result.returncode == 0, result.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stdout + result.stderr


def test_reward_system_yaml_hides_env_values_and_url_credentials(tmp_path, monkeypatch):
    import train_grpo
    from common.judges import make_rim_reward
    monkeypatch.setenv("PLANTED_JUDGE_URL", f"http://judge:{SECRET}@127.0.0.1:1/v1?key={SECRET}")
    cfg = load_config(train_grpo.Config, [
        "model_name_or_path=m", "beta=0", "use_vllm=false", "num_generations=4", f"output_dir={tmp_path / 'out'}",
        "reward_funcs=[format]",
        "teacher_reward={_target_: common.judges.RIMReward, reward_system: "
        "configs/reward_system/interpretation_offline.yaml, overrides: ['models.api_base=${env:PLANTED_JUDGE_URL}']}"])
    rim = make_rim_reward(cfg)
    assert not (tmp_path / "out").exists()  # nothing written before the first score (start-up checks first)
    rim.score([])
    rim.close()
    saved = (tmp_path / "out" / "reward_system.yaml").read_text()
    assert "api_base: <from environment>" in saved and SECRET not in saved
