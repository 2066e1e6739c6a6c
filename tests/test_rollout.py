"""common/rollout.py on a real tiny Llama (CPU): order, stop handling, padding, sampling log-probs,
seeds, training-state restore, prompt truncation, backend choice, and ZeRO-3 generation on 2 processes."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common.rollout import (HFGenerateEngine, Rollout, SamplingParams, cut_at_stop, engine_kind, left_pad,
                            make_engine, truncate_prompts)

ROOT = Path(__file__).resolve().parents[1]


def _load_tiny_model_builder():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load_tiny_model_builder()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tiny_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return tiny.build_tiny_model(tokenizer, hidden_size=32, layers=2, heads=4, seed=0).eval()


@pytest.fixture()
def prompts(tokenizer):
    return [tokenizer.encode(text) for text in ("12+30=", "hello there", "a")]  # different lengths


def teacher_forced_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits that predicted each completion token, from one unpadded forward pass. [N, V]"""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]   # [P + N, V]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]          # [N, V]


def chosen(logprobs: torch.Tensor, completion: list[int]) -> torch.Tensor:
    return logprobs.gather(1, torch.tensor(completion)[:, None]).squeeze(1)      # [N]


# ---------------------------------------------------------------------------------------------
def test_rollouts_are_prompt_major_with_one_entry_per_generation(model, tokenizer, prompts):
    engine = HFGenerateEngine(model, tokenizer)
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=3, seed=0))
    assert len(rollouts) == 9
    assert [(r.prompt_index, r.generation_index) for r in rollouts] == [(p, g) for p in range(3) for g in range(3)]
    for r in rollouts:
        assert isinstance(r, Rollout)
        assert r.prompt_ids == prompts[r.prompt_index]
        assert len(r.logprobs) == len(r.completion_ids) > 0
        assert r.completion_text == tokenizer.decode(r.completion_ids, skip_special_tokens=True)


def test_completions_end_at_first_eos_else_at_max_new_tokens(model, tokenizer, prompts):
    eos = tokenizer.eos_token_id
    engine = HFGenerateEngine(model, tokenizer)
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=40, num_generations=8, seed=3))
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}  # this seed produces both
    # Some rows ran to 40 tokens, so the batch decoded 40 steps: shorter stopped rows were cut.
    assert any(r.finish_reason == "stop" and len(r.completion_ids) < 40 for r in rollouts)
    for r in rollouts:
        if r.finish_reason == "stop":
            assert r.completion_ids[-1] == eos and eos not in r.completion_ids[:-1]
            assert len(r.completion_ids) <= 40
        else:
            assert len(r.completion_ids) == 40 and eos not in r.completion_ids


def test_stop_token_ids_cut_greedy_completion_exactly(model, tokenizer, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=10)
    full = HFGenerateEngine(model, tokenizer).generate(prompts[:1], params)[0]
    assert full.finish_reason == "length" and len(full.completion_ids) == 10
    stop = full.completion_ids[3]
    cut = full.completion_ids.index(stop) + 1
    stopped = HFGenerateEngine(model, tokenizer, stop_token_ids=[stop]).generate(prompts[:1], params)[0]
    assert stopped.completion_ids == full.completion_ids[:cut]
    assert stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(full.logprobs[:cut], abs=1e-6)


def test_left_padding_does_not_change_greedy_completions(model, tokenizer, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    engine = HFGenerateEngine(model, tokenizer)
    together = engine.generate(prompts, params)
    for prompt, batched in zip(prompts, together):
        alone = engine.generate([prompt], params)[0]
        assert batched.completion_ids == alone.completion_ids
        assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    micro_batched = HFGenerateEngine(model, tokenizer, batch_size=2).generate(prompts, params)
    assert [r.completion_ids for r in micro_batched] == [r.completion_ids for r in together]
    assert [r.prompt_index for r in micro_batched] == [0, 1, 2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prompt_prefill_gives_the_same_rollouts(model, tokenizer, prompts, temperature):
    """Each prompt prefilled once and its cache repeated for its G rows == every row prefilled alone."""
    params = SamplingParams(temperature=temperature, max_new_tokens=12, num_generations=3, seed=5)
    shared = HFGenerateEngine(model, tokenizer, share_prompt_prefill=True).generate(prompts, params)
    alone = HFGenerateEngine(model, tokenizer, share_prompt_prefill=False).generate(prompts, params)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in alone]
    for a, b in zip(shared, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(r.completion_ids) for r in shared}) > len(prompts) or temperature == 0   # rows differ


def test_shared_prefill_steps_aside_for_a_generation_config_cache(model, tokenizer, prompts):
    """generate() refuses a cache passed in when the generation config names its own (static, hybrid)."""
    model.generation_config.cache_implementation = "static"
    params = SamplingParams(temperature=0, max_new_tokens=6, num_generations=2)
    shared = HFGenerateEngine(model, tokenizer, share_prompt_prefill=True).generate(prompts, params)
    alone = HFGenerateEngine(model, tokenizer, share_prompt_prefill=False).generate(prompts, params)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in alone]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_teacher_forced_forward(model, tokenizer, prompts, temperature):
    # Sampling defaults shipped in a model's generation_config must not leak into rollouts.
    model.generation_config.update(do_sample=True, temperature=0.3, top_k=3, top_p=0.5)
    engine = HFGenerateEngine(model, tokenizer)
    rollouts = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=16,
                                                       num_generations=2, seed=1))
    ranks = []
    for r in rollouts:
        logits = teacher_forced_logits(model, r.prompt_ids, r.completion_ids)          # [N, V]
        expected = chosen(torch.log_softmax(logits / temperature, dim=-1), r.completion_ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)
        ranks += (logits > chosen(logits, r.completion_ids)[:, None]).sum(dim=-1).tolist()
    assert max(ranks) > 10  # drawn from the whole vocabulary, not a leaked top_k=3


def test_sampling_logprobs_follow_top_k_and_min_p_renormalization(model, tokenizer, prompts):
    temperature, top_k, min_p = 0.05, 5, 0.2  # sharp enough for min_p to drop some of the top 5
    rollouts = HFGenerateEngine(model, tokenizer).generate(
        prompts, SamplingParams(temperature=temperature, top_k=top_k, min_p=min_p, max_new_tokens=12,
                                num_generations=2, seed=2))
    min_p_dropped = 0
    for r in rollouts:
        scores = teacher_forced_logits(model, r.prompt_ids, r.completion_ids) / temperature   # [N, V]
        kth_best = scores.topk(top_k, dim=-1).values[:, -1:]                                    # [N, 1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
        probs = scores.softmax(dim=-1)                                                          # [N, V]
        below_min_p = probs < min_p * probs.max(dim=-1, keepdim=True).values                    # [N, V]
        min_p_dropped += int((below_min_p & (probs > 0)).sum())
        scores = scores.masked_fill(below_min_p, float("-inf"))
        expected = chosen(torch.log_softmax(scores, dim=-1), r.completion_ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)
    assert min_p_dropped > 0


def test_sampling_logprobs_include_repetition_penalty(model, tokenizer, prompts):
    penalty = 1.5
    rollouts = HFGenerateEngine(model, tokenizer).generate(
        prompts, SamplingParams(repetition_penalty=penalty, max_new_tokens=12, seed=4))
    for r in rollouts:
        logits = teacher_forced_logits(model, r.prompt_ids, r.completion_ids)      # [N, V]
        for step in range(len(r.completion_ids)):
            seen = torch.tensor(sorted(set(r.prompt_ids + r.completion_ids[:step])))
            row = logits[step].clone()                                                  # [V]
            row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
            expected = torch.log_softmax(row, dim=-1)[r.completion_ids[step]]
            assert r.logprobs[step] == pytest.approx(expected.item(), abs=1e-4)


def test_seed_makes_sampling_reproducible_without_touching_global_rng(model, tokenizer, prompts):
    engine = HFGenerateEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=16, num_generations=2, seed=7)
    rng_before = torch.get_rng_state()
    first = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = engine.generate(prompts, params)
    other_seed = engine.generate(prompts, SamplingParams(max_new_tokens=16, num_generations=2, seed=8))
    assert [r.completion_ids for r in first] == [r.completion_ids for r in second]
    assert [r.completion_ids for r in first] != [r.completion_ids for r in other_seed]


def test_generate_restores_training_mode_and_gradient_checkpointing(model, tokenizer, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=8)
    for module in model.modules():  # dropout makes train-mode decoding differ from eval-mode decoding
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.9
    reference = HFGenerateEngine(model, tokenizer).generate(prompts, params)
    model.train()
    model.model.embed_tokens.eval()  # a submodule kept in eval on purpose stays so
    model.gradient_checkpointing_enable()
    model.config.use_cache = False  # what training scripts set alongside checkpointing
    rollouts = HFGenerateEngine(model, tokenizer).generate(prompts, params)
    assert model.training and model.is_gradient_checkpointing
    assert not model.model.embed_tokens.training
    assert all(module.training for module in model.modules() if module is not model.model.embed_tokens)
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in reference]
    assert torch.is_grad_enabled()

    model.eval()
    HFGenerateEngine(model, tokenizer).generate(prompts, params)
    assert not model.training


def test_truncate_prompts_keeps_the_end_or_raises():
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    assert truncate_prompts(prompts, 3) == ([[3, 4, 5], [6, 7], [9, 10, 11]], 2)
    assert truncate_prompts(prompts, 3, side="right") == ([[1, 2, 3], [6, 7], [8, 9, 10]], 2)
    assert truncate_prompts(prompts, 5, on_overflow="error") == (prompts, 0)
    assert truncate_prompts(prompts, None) == (prompts, 0)
    with pytest.raises(ValueError, match=r"max_prompt_length=3.*longest has 5 tokens"):
        truncate_prompts(prompts, 3, on_overflow="error")
    with pytest.raises(ValueError, match="on_overflow"):
        truncate_prompts(prompts, 3, on_overflow="drop")


def test_pure_helpers():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 2, 9, 2], stop_token_ids=[2, 3]) == (2, "stop")
    assert cut_at_stop([4, 5], stop_token_ids=[2]) == (2, "length")


def test_sampling_params_reject_bad_values():
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=0), dict(min_p=1.5),
                dict(max_new_tokens=0), dict(num_generations=0), dict(repetition_penalty=0.0)):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=f"SamplingParams.{key}"):
            SamplingParams(**bad)


def test_make_engine_builds_hf_and_refuses_unknown_backends(model, tokenizer):
    assert isinstance(make_engine("hf", model=model, tokenizer=tokenizer), HFGenerateEngine)
    with pytest.raises(ValueError, match="hf, vllm, server"):
        make_engine("sglang")
    assert [engine_kind(False, False), engine_kind(True, False), engine_kind(True, True)] == ["hf", "vllm", "server"]
    assert engine_kind(True, False, use_ray=True) == "ray"


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 on 2 CPU processes: weights are partitioned, each process generates a different
# number of prompts and lengths (no lockstep), results equal an unpartitioned copy, training continues.
ZERO3_WORKER = textwrap.dedent('''
    import importlib, json, sys
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip the JIT shm op
    import torch
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs
    sys.path.insert(0, sys.argv[1])
    from common.rollout import HFGenerateEngine, SamplingParams
    from tests.test_rollout import tiny

    plugin = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition all
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank = accelerator.process_index
    tokenizer = tiny.build_tiny_tokenizer()
    reference = tiny.build_tiny_model(tokenizer, hidden_size=32, layers=2, heads=4, seed=0).eval()
    model = tiny.build_tiny_model(tokenizer, hidden_size=32, layers=2, heads=4, seed=0)
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    partitioned = all(p.numel() == 0 for p in model.module.parameters())

    texts = ["12+30=", "hello there", "a"] if rank == 0 else ["xyz"]
    prompts = [tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_new_tokens=12 if rank == 0 else 3)
    engine = HFGenerateEngine(model, tokenizer, accelerator=accelerator, batch_size=1)
    rollouts = engine.generate(prompts, params)
    expected = HFGenerateEngine(reference, tokenizer).generate(prompts, params)

    batch = torch.tensor([prompts[0] + rollouts[0].completion_ids])
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    after_step = engine.generate(prompts, params)  # hooks and partitioning work again after generation
    shared_prompt = engine.generate([tokenizer.encode("same")], SamplingParams(max_new_tokens=8, seed=5))
    json.dump({
        "partitioned": partitioned,
        "same_as_reference": [r.completion_ids for r in rollouts] == [r.completion_ids for r in expected],
        "logprobs_close": all(abs(a - b) < 1e-4 for r, e in zip(rollouts, expected)
                              for a, b in zip(r.logprobs, e.logprobs)),
        "lengths": [len(r.completion_ids) for r in rollouts],
        "training_mode_restored": model.module.training,
        "loss_finite": bool(torch.isfinite(loss)),
        "generated_after_step": len(after_step) == len(prompts),
        "shared_prompt_sample": shared_prompt[0].completion_ids,
    }, open(sys.argv[2] + f".{rank}", "w"))
''')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_zero3_generation_on_two_processes(tmp_path):
    worker = tmp_path / "zero3_worker.py"
    worker.write_text(ZERO3_WORKER)
    result = tmp_path / "result"
    # Not ACCELERATE_USE_CPU: accelerate then never selects DeepSpeed. Without a GPU DeepSpeed runs on CPU.
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--main_process_port", str(_free_port()), str(worker), str(ROOT), str(result)]
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    reports = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["partitioned"]
        assert report["same_as_reference"] and report["logprobs_close"]
        assert report["training_mode_restored"] and report["loss_finite"] and report["generated_after_step"]
    assert len(reports[0]["lengths"]) == 3 and max(reports[0]["lengths"]) <= 12
    assert len(reports[1]["lengths"]) == 1 and reports[1]["lengths"][0] <= 3
    assert reports[0]["shared_prompt_sample"] != reports[1]["shared_prompt_sample"]  # seed + process index
