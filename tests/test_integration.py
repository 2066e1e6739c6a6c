"""Whole paths through the scripts: runtime traces -> GRPO and SFT; GRPO rewarded by LLM judges over real HTTP."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from conftest import ONE_THREAD, run_python, side_by_side
from openai_stub_server import OpenAIStubServer, StubReply
from test_traces import _atlas_store


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def sdk_export(tmp_path_factory) -> Path:
    """A trace file written by the arc-atlas package's own exporter, its sessions repeated to make a dataset."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from atlas.cli.jsonl_writer import export_sessions

    single = tmp_path_factory.mktemp("atlas") / "one.jsonl"
    asyncio.run(export_sessions(_atlas_store(), single, include_all_review_statuses=True))
    lines = single.read_text().splitlines()
    export = single.with_name("export.jsonl")
    export.write_text("\n".join(lines * 6) + "\n")
    return export


def judge_verdict(request) -> StubReply:
    """Scores vary with the judged text, so GRPO groups have a spread; about 30 % of calls fail with HTTP 500."""
    if request.index % 10 in (1, 4, 7):
        return StubReply(status=500)
    score = (sum(map(ord, request.text)) % 11) / 10
    return StubReply(content=json.dumps({"principles": [], "score": score, "rationale": "ok", "uncertainty": 0.1}))


def judge_overrides(server, *extra: str) -> str:
    items = [f"models.api_base={server.base_url}", "models.small_model=openai/small", "models.large_model=openai/large",
             "retry_backoff=0.01", "max_retries=4", "timeout=10", "temperatures=[0.2, 0.8]", *extra]
    return "teacher_reward.overrides=" + json.dumps(items)


RIM_RECIPE = ("defaults:\n  - model: tiny\n  - data: arithmetic_rl\n  - trainer: grpo\n"
              "  - reward: interpretation_teaching\nreward_funcs: [rim]\nuse_vllm: false\n")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sdk_export, tmp_path_factory) -> dict:
    """The three runs below side by side, each GRPO run against its own judge stub server; every test reads its own:
    name -> (output_dir, result, requests its server saw)."""
    root = tmp_path_factory.mktemp("integration")
    recipe = root / "rim.yaml"
    recipe.write_text(RIM_RECIPE)
    with OpenAIStubServer(reply=judge_verdict) as traces_server, OpenAIStubServer(reply=judge_verdict) as rim_server:
        traces_grpo = [
            "train_grpo.py", "--config", "configs/recipe/traces_grpo.yaml", f"dataset_path={sdk_export}",
            f"model_name_or_path={tiny_model_dir}", f"output_dir={root / 'traces_grpo'}", judge_overrides(traces_server),
            "attn_implementation=sdpa", "torch_dtype=float32", "bf16=false", "gradient_checkpointing=false",
            "train_batch_size=16", "per_device_train_batch_size=8", "num_generations=8", "max_steps=2",
            "max_completion_length=12", "eval_split_ratio=0", "do_eval=false", "save_steps=0", "logging_steps=1"]
        rim = [
            "train_grpo.py", "--config", str(recipe), f"model_name_or_path={tiny_model_dir}", f"output_dir={root / 'rim'}",
            judge_overrides(rim_server, "parallel_execution.client_processes=2"), "teacher_reward.completion_as=answer",
            "make_dataset_fn.num_samples=64", "train_batch_size=16", "per_device_train_batch_size=16", "max_steps=2",
            "max_completion_length=6", "beta=0", "do_eval=false", "save_steps=0", "bf16=false",
            "gradient_checkpointing=false"]
        traces_sft = [
            "train_sft.py", "--config", "configs/recipe/traces_sft.yaml", f"dataset_path={sdk_export}",
            f"model_name_or_path={tiny_model_dir}", f"output_dir={root / 'traces_sft'}", "attn_implementation=sdpa",
            "torch_dtype=float32", "bf16=false", "gradient_checkpointing=false", "train_batch_size=4",
            "per_device_train_batch_size=4", "max_steps=8", "num_train_epochs=1", "max_seq_length=2048",
            "learning_rate=3e-3", "eval_split_ratio=0", "do_eval=false", "save_steps=0", "logging_steps=1"]
        results = side_by_side(*[lambda args=args: run_python(args, env=ONE_THREAD)
                                 for args in (traces_grpo, rim, traces_sft)])
        requests = {"traces_grpo": list(traces_server.requests), "rim": list(rim_server.requests), "traces_sft": []}
    return {name: (root / name, result, requests[name])
            for name, result in zip(("traces_grpo", "rim", "traces_sft"), results)}


def test_grpo_on_runtime_traces_with_judges_that_fail_30_percent(runs, sdk_export):
    out, result, requests = runs["traces_grpo"]
    assert_ok(result)
    assert requests, "the judges were never called"
    rows = [r for r in metrics(out) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["judge/calls"] > 0 for r in rows)
    assert sum(r["judge/failures"] + r["judge/retries"] for r in rows) > 0
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)
    saved = (out / "config.yaml").read_text()
    assert "dataset_path" in saved and str(sdk_export) in saved


def test_grpo_plain_rim_reward_on_arithmetic(runs):
    """`reward_funcs=[rim]` with the reward preset: plain GRPO trains from judge scores, litellm in 2 client processes."""
    out, result, requests = runs["rim"]
    assert_ok(result)
    assert requests, "the judges were never called"
    rows = [r for r in metrics(out) if "reward" in r]
    assert len(rows) == 2 and "judge/latency_p50" in rows[0] and "judge/cost_usd" in rows[0]
    assert sum(r["judge/failures"] + r["judge/retries"] for r in rows) > 0


def test_sft_on_runtime_traces_learns_the_teachers_guidance(runs):
    out, result, _ = runs["traces_sft"]
    assert_ok(result)
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
