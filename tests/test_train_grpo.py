"""train_grpo.py end to end on a tiny model: learning from a reward, resume, 2 processes, bad input."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ONE_THREAD, accelerate_launch, run_python, runs_per_case, side_by_side

RECIPE = "configs/recipe/quickstart_grpo.yaml"


def grpo_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    # reward: the completion starts with a digit; a random tiny model does so ~10 % of the time
    return ["train_grpo.py", "--config", RECIPE, f"model_name_or_path={model_dir}", f"output_dir={output_dir}",
            "make_dataset_fn.num_samples=300", "reward_funcs=[format]", r"format_pattern=\d.*",
            "max_completion_length=4", "train_batch_size=64", "per_device_train_batch_size=32", "num_generations=8",
            "learning_rate=3e-3", "logging_steps=1", "eval_on_start=false", "do_eval=false", "save_steps=0", *extra]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_grpo_reward_rises_and_logs_its_metrics(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_python(grpo_args(tiny_model_dir, out, "max_steps=30", "beta=0.04", "log_completions=true",
                                   "logging_prob=0.5")))
    rows = [r for r in metrics(out) if "reward" in r]
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 30
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    for key in ("kl", "clip_ratio/region", "frac_zero_std_groups", "rewards/format/mean", "completions/mean_length",
                "completions/truncated_frac", "time/generate", "time/reward", "time/train", "tokens_per_second"):
        assert key in rows[-1], key
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert completions and {"prompt", "completion", "reward", "advantage", "step"} <= set(completions[0])
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


# with save_steps=2: checkpoints at steps 2 and 4; num_iterations=2: steps 2 and 4 reuse the rollouts of 1 and 3
STRAIGHT = ["max_steps=4", "save_steps=2", "save_total_limit=3", "num_iterations=2", "beta=0.04",
            "max_completion_length=6"]


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two 4-step runs side by side, with and without shared prompt prefixes (the default shares them). The resume
    test resumes the first; the shared-prompt test compares the two."""
    root = tmp_path_factory.mktemp("grpo_straight")
    results = side_by_side(*[lambda share=share: run_python(grpo_args(
        tiny_model_dir, root / share, *STRAIGHT, f"share_prompt_prefix={share}"), env=ONE_THREAD)
        for share in ("true", "false")])
    for result in results:
        assert_ok(result)
    return {share: root / share for share in ("true", "false")}


def test_grpo_resume_replays_the_same_rollouts(straight_runs, tiny_model_dir, tmp_path):
    straight = straight_runs["true"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert_ok(run_python(grpo_args(tiny_model_dir, resumed, *STRAIGHT, "share_prompt_prefix=true",
                                   "resume_from_checkpoint=latest"), env=ONE_THREAD))
    before = {r["step"]: r for r in metrics(straight)}
    after = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in after] == [3, 4]
    assert "reward" in after[0] and "reward" not in after[1]  # step 4 reuses step 3's rollouts (num_iterations=2)
    for row in after:  # same RNG, same weights -> the same samples, rewards and loss
        assert row.get("reward") == pytest.approx(before[row["step"]].get("reward"))
        assert row["loss"] == pytest.approx(before[row["step"]]["loss"], abs=1e-6)
        assert row["kl"] == pytest.approx(before[row["step"]]["kl"], abs=1e-6)


def test_grpo_two_processes_with_reference_and_dapo(tiny_model_dir, tmp_path):
    out = tmp_path / "two"
    result = accelerate_launch(grpo_args(tiny_model_dir, out, "max_steps=2", "per_device_train_batch_size=16",
                                         "beta=0.04", "loss_type=dapo", "num_iterations=2", "save_steps=2"))
    assert_ok(result)
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["kl"] >= 0 for r in rows)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


BAD_INPUT = [
    (["reward_funcs=[acuracy]"], r"unknown \['acuracy'\]; available: .*arithmetic"),
    (["num_generations=1"], "needs >= 2 completions"),
    (["num_generations=5"], "does not divide train_batch_size"),
    (["use_vllm_server=true", "vllm_host=localhost", "vllm_port=1"], "vLLM server at localhost:1 is down"),
    (["use_vllm_server=true", "vllm_host=localhost", "vllm_port=1", "vllm_servers=[nowhere]"],
     "vllm_servers entry 'nowhere': expected host:port"),
    (["use_ray=true"], r"use_ray=true runs the vLLM engine \(use_vllm=true\) in a Ray actor"),
    (["use_ray=true", "use_vllm=true", "use_vllm_server=true", "vllm_host=localhost", "vllm_port=1"],
     "use_ray=true with use_vllm_server=true"),
    (["use_vllm=true", "vllm_tensor_parallel_size=3"], "vllm_tensor_parallel_size' = 3: expected a divisor"),
    (["beta=0.1", "ref_model_name_or_path=./no/such/ref"], "needs a reference model"),
    (["max_prompt_length=4", "prompt_overflow=error"], "exceed max_prompt_length=4"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model_dir, tmp_path_factory) -> dict:
    """One run per BAD_INPUT case, side by side: the case's overrides (a tuple) -> (output_dir, result)."""
    return runs_per_case(BAD_INPUT, lambda out, *extra: grpo_args(tiny_model_dir, out, *extra),
                         tmp_path_factory.mktemp("grpo_bad_input"))


@pytest.mark.parametrize("extra,message", BAD_INPUT)
def test_bad_input_fails_before_models_load(bad_input_runs, extra, message):
    out, result = bad_input_runs[tuple(extra)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_prompt_truncation_is_counted(tiny_model_dir, tmp_path):
    out = tmp_path / "cut"
    result = run_python(grpo_args(tiny_model_dir, out, "max_prompt_length=6", "max_steps=1"))
    assert_ok(result)
    assert re.search(r"\d+ of \d+ prompts are longer than max_prompt_length=6", result.stderr)


# ---------------------------------------------------------------------------------------------
# share_prompt_prefix: one forward per distinct prompt, the same numbers as the full forward
# ---------------------------------------------------------------------------------------------
def _rollouts(lengths: list[tuple[int, list[int]]], seed: int = 0):
    """[(prompt length, [completion lengths...]), ...] -> rollouts, prompt-major like the engine's."""
    import torch

    from common.rollout import Rollout

    generator = torch.Generator().manual_seed(seed)
    rollouts = []
    for index, (prompt_length, completion_lengths) in enumerate(lengths):
        prompt = torch.randint(4, 40, (prompt_length,), generator=generator).tolist()
        for g, c in enumerate(completion_lengths):
            rollouts.append(Rollout(prompt, torch.randint(4, 40, (c,), generator=generator).tolist(), None,
                                    "length", index, g))
    return rollouts


@pytest.mark.parametrize("lengths", [
    [(9, [5, 3, 5, 1]), (6, [4, 5, 2, 5])],     # two groups, uneven prompts and completions
    [(7, [5, 5, 4])],                             # one group; the micro-batch holds part of it
    [(5, [1, 1]), (8, [1, 1])],                   # one-token completions: the prompt pass alone
])
def test_shared_prompt_forward_equals_the_full_forward(tiny_model_dir, lengths):
    import torch
    from transformers import AutoModelForCausalLM

    from common import logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    from common.logprobs import cache_argument

    cache_arg = cache_argument(model)
    assert cache_arg in ("cache", "past_key_values")
    rollouts = _rollouts(lengths)
    batch = logprobs.rollout_batch(rollouts, pad_token_id=0, mask_truncated=False, share_prompts=True)
    assert batch.prompt_of_row.tolist() == [r.prompt_index for r in rollouts]
    mask = batch.completion_mask
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))

    def run(arg):
        model.zero_grad()
        logps = logprobs.completion_logprobs(model, batch, temperature=0.7, cache_arg=arg)   # [B, C]
        (logps * mask * weights).sum().backward()
        return logps.detach() * mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = run(None)
    shared, shared_grads = run(cache_arg)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rollout_batch_maps_rows_to_distinct_prompts_the_same_way_on_every_process():
    """With sharing on, every micro-batch gets the map (identity when nothing repeats) and >= 2 completion
    columns, so every process runs the same forwards (ZeRO-3 / DDP pair collectives by count)."""
    from common import logprobs

    distinct = logprobs.rollout_batch(_rollouts([(4, [1]), (5, [1])]), 0, False, share_prompts=True)
    assert distinct.prompt_of_row.tolist() == [0, 1] and distinct.prompt_first_row.tolist() == [0, 1]
    assert distinct.completion_width == 2 and distinct.completion_mask.tolist() == [[1, 0], [1, 0]]
    repeated = logprobs.rollout_batch(_rollouts([(4, [2, 2]), (5, [3])]), 0, False, share_prompts=True)
    assert repeated.prompt_of_row.tolist() == [0, 0, 1] and repeated.prompt_first_row.tolist() == [0, 2]
    off = logprobs.rollout_batch(_rollouts([(4, [1, 1])]), 0, False, share_prompts=False)
    assert off.prompt_of_row is None and off.completion_width == 1


def test_grpo_run_is_the_same_with_and_without_shared_prompts(straight_runs):
    runs = {share: [r for r in metrics(out) if "loss" in r] for share, out in straight_runs.items()}
    assert len(runs["true"]) == 4
    for shared, full in zip(runs["true"], runs["false"]):
        assert shared.get("reward") == full.get("reward")       # the same rollouts
        assert shared["loss"] == pytest.approx(full["loss"], abs=1e-5)
        assert shared["kl"] == pytest.approx(full["kl"], abs=1e-5)


DDP_CHECK = '''
import json, sys
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM
sys.path.insert(0, ".")
from common import logprobs
from common.logprobs import cache_argument
from test_train_grpo import _rollouts

model_dir, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
reference, model = load(), accelerator.prepare(load())
rollouts = _rollouts([(6 + rank, [4, 2, 4]), (4, [3, 4, 1])], seed=rank)   # each rank its own rows
batch = logprobs.rollout_batch(rollouts, 0, False, share_prompts=True)
cache_arg = cache_argument(accelerator.unwrap_model(model))
logps = logprobs.completion_logprobs(model, batch, 1.0, cache_arg)   # two forwards through DDP, one backward
accelerator.backward((logps * batch.completion_mask).sum())
(logprobs.completion_logprobs(reference, batch, 1.0) * batch.completion_mask).sum().backward()
worst = 0.0
for (name, p), q in zip(accelerator.unwrap_model(model).named_parameters(), reference.parameters()):
    expected = accelerator.reduce(q.grad.clone(), "mean")   # what DDP's all-reduce must give
    worst = max(worst, (p.grad - expected).abs().max().item())
if rank == 0:
    json.dump({"worst": worst, "cache_arg": cache_arg}, open(out, "w"))
'''


def test_shared_prompt_backward_through_ddp_averages_gradients_over_processes(tiny_model_dir, tmp_path):
    """Two forwards (prompts, then completions) per backward through DistributedDataParallel, 2 processes."""
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK)
    result = accelerate_launch([str(script), str(tiny_model_dir), str(tmp_path / "out.json")],
                               extra_env={"PYTHONPATH": f"{Path(__file__).resolve().parent}:{Path(__file__).resolve().parents[1]}"})
    assert_ok(result)
    found = json.loads((tmp_path / "out.json").read_text())
    assert found["cache_arg"] is not None and found["worst"] < 1e-5, found


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprobs_from_the_lm_head_equal_the_logits_path(tiny_model_dir, share, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from common import logprobs
    from common.logprobs import cache_argument, plain_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    model.train()
    head = plain_lm_head(model)
    assert head is not None and model.config.tie_word_embeddings   # the tied case: two uses of one weight
    batch = logprobs.rollout_batch(_rollouts([(9, [5, 3, 5, 1]), (6, [4, 5, 2, 5])]), 0, False, share_prompts=share)
    cache_arg = cache_argument(model) if share else None
    mask = batch.completion_mask
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))

    def run(lm_head):
        model.zero_grad()
        logps = logprobs.completion_logprobs(model, batch, 0.7, cache_arg, lm_head)   # [B, C]
        assert logps.dtype == torch.float32 and logps.shape == mask.shape
        (logps * mask * weights).sum().backward()
        return logps.detach() * mask, {n: p.grad.float().clone() for n, p in model.named_parameters()}

    (expected, expected_grads), (found, grads) = run(None), run(head)
    assert "forward" not in vars(head)   # the lm_head is itself again
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(found, expected, **tolerance)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **tolerance, msg=name)
    assert logprobs.lm_head_logprobs_agree(model, head, batch, 0.7, cache_arg)


def test_a_model_that_scales_its_logits_keeps_the_logits_path(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from common import logprobs
    from common.logprobs import plain_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = logprobs.rollout_batch(_rollouts([(5, [3, 3])]), 0, False)
    model.config.final_logit_softcapping = 30.0   # declared: refused without running anything
    assert not logprobs.lm_head_logprobs_agree(model, plain_lm_head(model), batch, 1.0, None)
    del model.config.final_logit_softcapping
    original = type(model).forward

    def scaled_forward(self, *args, **kwargs):   # undeclared: a transform after lm_head, caught by the values
        output = original(self, *args, **kwargs)
        output.logits = output.logits * 0.5
        return output

    type(model).forward = scaled_forward
    try:
        assert not logprobs.lm_head_logprobs_agree(model, plain_lm_head(model), batch, 1.0, None)
    finally:
        type(model).forward = original
