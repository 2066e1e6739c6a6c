"""GRPO optimizer-step wall time and peak memory: train_grpo.py vs TRL `GRPOTrainer`, same settings.

Both trainers get:
- the same tiny random Llama (scripts/make_tiny_model.py; `--hidden-size` / `--layers`), float32, sdpa, no gradient
  checkpointing, no mixed precision; with beta > 0 both load a second copy as the frozen reference model;
- the same prompts: the arithmetic task (`common.data.make_arithmetic_dataset`, "12+34=" as a user turn), rendered
  by the same chat template, sampled in random order by each trainer's own seeded sampler; with
  `--context-tokens N` each prompt is preceded by ~N tokens of its own worked examples (the teacher's shape: a
  long context of its own per prompt -- question and student trace -- and a shorter completion);
- the same reward: `common.rewards` "arithmetic" (ours by name; TRL through a callable that wraps the same function);
- the same rollout settings: transformers `generate` on the policy (TRL: use_vllm=False), `--num-generations` G
  completions per prompt, `--max-completion-length` new tokens, temperature 1, no top-k / top-p / min-p,
  repetition penalty 1, and the same objective: loss_type, beta (k3 KL), epsilon 0.2 both sides, group-scaled
  advantages, one optimizer step per generation batch (num_iterations 1, so no old-logprob pass in either);
- the same batch: `--prompts-per-step` x G completions per optimizer step in micro-batches of `--micro-batch`.
  Ours: train_batch_size = prompts x G (completions per step), per_device_train_batch_size = micro-batch.
  TRL counts the same things differently: per_device_train_batch_size = micro-batch (completions),
  gradient_accumulation_steps = prompts x G / micro-batch, and steps_per_generation left at its default
  (= gradient_accumulation_steps), so generation_batch_size = prompts x G: one generate() call per optimizer step
  over all of its completions, as ours does (generation_batch_size null);
- the same optimizer (torch AdamW, constant learning rate, no weight decay, max_grad_norm 1.0), seed, and thread
  count (1 by default: on a shared 2-core machine two OpenMP threads stall whenever one of them is descheduled).

Timing, per optimizer step, start-up and model loading excluded, first `--warmup` steps of each run discarded:
- ours: `step_seconds` in output_dir/metrics.jsonl (rollout + reward + reference logprobs + update);
- TRL: on_step_end -> next on_step_end (a TrainerCallback), the whole loop including the prompt fetch; the
  "TRL core" figure is on_step_begin -> on_step_end (TRL generates inside training_step, so it is included).
- both: "CPU s/step", the process CPU time between consecutive step ends (ours: at each per-step metrics write,
  TRL: at on_step_end). Unlike wall time it hardly moves when other jobs load the machine; prefer it there.
`--repeats N` runs each trainer N times in alternating order (ours, TRL, TRL, ours, ...) and pools the steps.
Memory: ru_maxrss (RSS high-water mark) of each child process, and the same minus the RSS right after
`import torch, transformers` in that process (what each trainer adds on top of the libraries both need).

Settings with no exact equal (also printed):
- TRL tokenizes the prompts (apply_chat_template) inside every step; ours tokenizes the dataset once at start-up.
- ours records the sampling log-probability of each generated token (a logits processor, log_softmax per decode
  step); TRL, without vLLM, does not. Neither uses them for the loss here.
- TRL computes per-token entropies in the training forward (its fused LM head) for logging; ours does not.
- ours' `max_prompt_length` (left truncation) has no TRL 1.16 equal; prompts here are ~15 tokens, never truncated.
- random prompt order: each trainer uses its own sampler, so the prompts (not their lengths) differ per step.
- ours runs with its default `share_prompt_prefix: true`: each distinct prompt is prefilled once in generation and
  run once per micro-batch in the reference and policy forwards, its KV cache shared by its G completions (the
  same logprobs and gradients, tests/test_train_grpo.py); TRL runs every row in full. `--no-share` turns it off.
  Ours also runs with `logprobs_from_hidden: true` (lm_head returns chunked logprobs); at this vocabulary (~100
  characters) that changes neither time nor memory measurably.

    .venv/bin/python bench/grpo_step.py                           # defaults: a few minutes on 2 cores
    .venv/bin/python bench/grpo_step.py --beta 0 --max-completion-length 64 --num-generations 16
    .venv/bin/python bench/grpo_step.py --context-tokens 200                  # teacher-shaped prompts
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from harness import (add_common_arguments, parameter_count, record_step_cpu_times, run_child,
                     run_order, run_benchmark, step_cpu_seconds, tiny_model)

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.7  # the project's target: our step time <= 0.7 x TRL's


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Children: one training run each, results as JSON
# ---------------------------------------------------------------------------------------------------------------------
def make_context_dataset(cfg, num_samples: int, context_tokens: int = 0, **_) -> list:
    """The arithmetic prompts, each after ~`context_tokens` characters (= tokens of the tiny model's character
    tokenizer) of worked examples of its own. A `make_dataset_fn` for ours; TRL gets the same list."""
    from common.data import make_arithmetic_dataset

    examples = make_arithmetic_dataset(cfg, num_samples=num_samples)
    rng = random.Random(cfg.seed + 1)
    for example in examples:
        solved = []
        while sum(len(line) + 1 for line in solved) < context_tokens:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            solved.append(f"{a}+{b}={a + b}")
        if solved:
            example.prompt[-1]["content"] = " ".join(solved) + "\n" + example.prompt[-1]["content"]
    return examples



def run_ours(spec: dict) -> dict:
    import runpy

    out = Path(spec["output_dir"])
    overrides = [
        f"model_name_or_path={spec['model_dir']}", f"output_dir={out}", f"seed={spec['seed']}",
        f"make_dataset_fn={{_target_: grpo_step.make_context_dataset, num_samples: {spec['num_prompts']}, "
        f"context_tokens: {spec['context_tokens']}}}", "eval_split_ratio=0", "do_eval=false",
        "eval_on_start=false", "reward_funcs=[arithmetic]", "use_vllm=false",
        f"max_steps={spec['max_steps']}", f"train_batch_size={spec['prompts_per_step'] * spec['num_generations']}",
        f"per_device_train_batch_size={spec['micro_batch']}", f"num_generations={spec['num_generations']}",
        f"max_completion_length={spec['max_completion_length']}",
        "temperature=1.0", "top_p=1.0", "top_k=null", "min_p=null", "repetition_penalty=1.0",
        f"beta={spec['beta']}", f"loss_type={spec['loss_type']}", "epsilon_low=0.2", "epsilon_high=0.2",
        "scale_rewards=group", "num_iterations=1", "mask_truncated_completions=false",
        f"learning_rate={spec['learning_rate']}", "lr_scheduler_type=constant", "warmup_ratio=0", "weight_decay=0",
        "max_grad_norm=1.0", "bf16=false", "gradient_checkpointing=false", "torch_dtype=float32",
        "attn_implementation=sdpa", "logging_steps=1", "save_steps=0", "log_completions=false", "report_to=[]",
        f"max_prompt_length={spec['max_prompt_length']}", f"share_prompt_prefix={str(spec['share']).lower()}",
    ]
    sys.argv = ["train_grpo.py", "--config", str(ROOT / "configs/recipe/quickstart_grpo.yaml"), *overrides]
    cpu_marks = record_step_cpu_times()
    runpy.run_path(str(ROOT / "train_grpo.py"), run_name="__main__")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step_seconds" in r]
    return {"seconds": [r["step_seconds"] for r in rows], "cpu_seconds": step_cpu_seconds(cpu_marks),
            "generate_seconds": [r.get("time/generate", float("nan")) for r in rows],
            "completion_length": [r["completions/mean_length"] for r in rows],
            "reward": [r["reward"] for r in rows]}


def run_trl(spec: dict) -> dict:
    from types import SimpleNamespace

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common.rewards import RewardInput, make_arithmetic_reward

    examples = make_context_dataset(SimpleNamespace(seed=spec["seed"]), spec["num_prompts"], spec["context_tokens"])
    dataset = Dataset.from_list([{"prompt": e.prompt, "ground_truth": e.ground_truth} for e in examples])
    score = make_arithmetic_reward()

    def arithmetic(prompts, completions, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score([RewardInput(prompt="", completion=t, ground_truth=g) for t, g in zip(texts, ground_truth)])

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.previous_end = 0.0
            self.cpu_marks: list[float] = []
            self.loop, self.core, self.completion_length, self.reward = [], [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.previous_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.loop.append(now - self.previous_end)
            self.core.append(now - self.begin)
            self.previous_end = now
            self.cpu_marks.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.completion_length.append(logs["completions/mean_length"])
                self.reward.append(logs.get("reward", float("nan")))

    completions_per_step = spec["prompts_per_step"] * spec["num_generations"]
    if completions_per_step % spec["micro_batch"]:
        raise ValueError(f"--micro-batch {spec['micro_batch']} must divide prompts x G = {completions_per_step}")
    config = GRPOConfig(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"], seed=spec["seed"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=completions_per_step // spec["micro_batch"],
        num_generations=spec["num_generations"], max_completion_length=spec["max_completion_length"],
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, use_vllm=False,
        beta=spec["beta"], loss_type=spec["loss_type"], epsilon=0.2, epsilon_high=0.2, scale_rewards="group",
        num_iterations=1, mask_truncated_completions=False, shuffle_dataset=True,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    if config.generation_batch_size != completions_per_step or config.steps_per_generation != \
            config.gradient_accumulation_steps:
        raise RuntimeError(f"TRL would generate {config.generation_batch_size} completions every "
                           f"{config.steps_per_generation} micro-steps; expected {completions_per_step} per "
                           f"optimizer step")
    timer = StepTimes()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[arithmetic], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"seconds": timer.loop, "core_seconds": timer.core, "cpu_seconds": step_cpu_seconds(timer.cpu_marks),
            "completion_length": timer.completion_length,
            "reward": timer.reward}


def child_main(kind: str, spec_file: str) -> None:
    import torch
    import transformers  # noqa: F401  (counted in the baseline RSS of both trainers)

    baseline = current_rss_mib()
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    result = run_ours(spec) if kind == "ours" else run_trl(spec)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["baseline_rss_mib"] = baseline
    Path(spec["result_file"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------------

def mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def measured(runs: list[dict], key: str, warmup: int) -> list[float]:
    """One per-step series, warm-up steps dropped, pooled over the repeats."""
    return [value for run in runs for value in run[key][warmup:]]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--micro-batch", type=int, default=32, help="completions per forward/backward")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04, help="k3 KL coefficient (> 0 loads a reference model)")
    parser.add_argument("--loss-type", choices=["grpo", "bnpo", "dr_grpo", "dapo"], default="grpo")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--num-prompts", type=int, default=2000, help="arithmetic prompts in the dataset")
    parser.add_argument("--context-tokens", type=int, default=0,
                        help="worked examples (~tokens) before each prompt: the teacher's long-context shape")
    parser.add_argument("--no-share", action="store_true", help="ours with share_prompt_prefix=false")
    return parser.parse_args()


def run_all(args, tmp: Path, model_dir: Path) -> dict[str, list[dict]]:
    """Every (repeat, trainer) run in its own process, alternating the order."""
    results: dict[str, list[dict]] = {}
    for repeat, kind in run_order(args.repeats):
        name = f"{kind}_{repeat}"
        spec = {"model_dir": str(model_dir), "output_dir": str(tmp / name),
                "result_file": str(tmp / f"{name}.json"),
                "max_steps": args.warmup + args.steps, "prompts_per_step": args.prompts_per_step,
                "num_generations": args.num_generations, "micro_batch": args.micro_batch,
                "max_completion_length": args.max_completion_length, "beta": args.beta,
                "loss_type": args.loss_type, "learning_rate": args.learning_rate, "num_prompts": args.num_prompts,
                "seed": args.seed, "threads": args.threads, "context_tokens": args.context_tokens,
                "max_prompt_length": args.context_tokens + 64, "share": not args.no_share}
        results.setdefault(kind, []).append(run_child(__file__, kind, name, spec, tmp, args.threads))
    return results


def print_settings(args, model_dir: Path) -> None:
    completions = args.prompts_per_step * args.num_generations
    print(f"\nmodel: Llama hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, "
          f"{parameter_count(model_dir) / 1e6:.2f}M parameters, float32, sdpa")
    print(f"per optimizer step: {args.prompts_per_step} prompts x G={args.num_generations} = {completions} "
          f"completions, micro-batch {args.micro_batch} (accumulation {completions // args.micro_batch}), "
          f"max_completion_length {args.max_completion_length}, beta {args.beta}, loss_type {args.loss_type}, "
          f"HF generate, {args.threads} threads; context tokens per prompt {args.context_tokens}; ours "
          f"share_prompt_prefix={not args.no_share}")
    print(f"ours: train_batch_size={completions} per_device_train_batch_size={args.micro_batch}; TRL: "
          f"per_device_train_batch_size={args.micro_batch} gradient_accumulation_steps="
          f"{completions // args.micro_batch} (generation_batch_size={completions}, steps_per_generation="
          f"{completions // args.micro_batch})")
    print(f"{args.warmup} warm-up steps discarded, {args.steps} measured; ours: step_seconds, TRL: on_step_end to "
          f"on_step_end (TRL core: on_step_begin to on_step_end);\nCPU s/step: process CPU time between "
          f"consecutive step ends (both); peak RSS: ru_maxrss, 'above libs' = minus RSS after importing torch + "
          f"transformers\n")


def report(args, results: dict[str, list[dict]]) -> None:
    header = (f"{'trainer':8s} {'mean s/step':>11s} {'median':>8s} {'min':>7s} {'TRL core':>9s} "
              f"{'CPU s/step':>10s} {'mean len':>9s} {'peak RSS MiB':>12s} {'above libs':>10s}")
    print(header)
    print("-" * len(header))
    summary = {}
    for kind in ("ours", "trl"):
        runs = results[kind]
        seconds = measured(runs, "seconds", args.warmup)
        if not seconds:
            raise RuntimeError(f"no steps left after discarding {args.warmup} warm-up steps; raise --steps")
        core = mean(measured(runs, "core_seconds", args.warmup)) if "core_seconds" in runs[0] else None
        peak = max(run["peak_rss_mib"] for run in runs)
        above = max(run["peak_rss_mib"] - run["baseline_rss_mib"] for run in runs)
        cpu = mean(measured(runs, "cpu_seconds", args.warmup))
        summary[kind] = {"seconds": mean(seconds), "median": statistics.median(seconds), "core": core, "peak": peak,
                         "cpu": cpu}
        print(f"{kind:8s} {mean(seconds):11.3f} {statistics.median(seconds):8.3f} {min(seconds):7.3f} "
              f"{'' if core is None else f'{core:.3f}':>9s} {cpu:10.3f} "
              f"{mean(measured(runs, 'completion_length', args.warmup)):9.1f} {peak:12.0f} {above:10.0f}")
    ours, trl_ = summary["ours"], summary["trl"]
    ratio = ours["seconds"] / trl_["seconds"]
    print(f"\nours/TRL mean step time: {ratio:.2f} (median: {ours['median'] / trl_['median']:.2f}, vs TRL core: "
          f"{ours['seconds'] / trl_['core']:.2f}); goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}")
    print(f"ours/TRL CPU time per step: {ours['cpu'] / trl_['cpu']:.2f} (robust to other load on a shared machine)")
    print(f"ours/TRL peak RSS: {ours['peak'] / trl_['peak']:.2f}")
    generate = mean(measured(results["ours"], "generate_seconds", args.warmup))
    print(f"ours: time/generate {generate:.3f} s of {ours['seconds']:.3f} s per step")
    print("\nnot equal by construction: TRL re-tokenizes prompts every step and computes entropies in its "
          "training forward;\nours records sampling log-probs during generate; prompts are drawn by each trainer's "
          "own sampler.")


def measure(args, tmp: Path) -> None:
    model_dir = tiny_model(tmp, args)
    results = run_all(args, tmp, model_dir)
    print_settings(args, model_dir)
    report(args, results)


def main() -> None:
    run_benchmark(parse_args(), child_main, "bench_grpo_", measure)


if __name__ == "__main__":
    main()
