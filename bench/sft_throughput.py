"""SFT training throughput (tokens/s): train_sft.py vs TRL `SFTTrainer`, same model, data and settings.

Both trainers get:
- the same tiny random Llama (built here with scripts/make_tiny_model.py; `--hidden-size` / `--layers`) in float32,
  sdpa attention, no gradient checkpointing, no mixed precision;
- the same synthetic chat records (running sums of 2-digit numbers, ~100-230 tokens each with the character-level
  tokenizer), in the same order (ours: shuffle=false; TRL: train_sampling_strategy="sequential"): ours reads them
  as a `messages` JSONL file, TRL as a `datasets.Dataset` in the conversational prompt/completion format, so both
  render the same chat template and take the loss on the completion only;
- the same batch (rows per optimizer step, no accumulation), steps, learning rate (constant, no warmup), AdamW
  (torch, betas 0.9/0.999, eps 1e-8, no weight decay), max_grad_norm 1.0, max length, and packing on/off;
- the same thread count (OMP_NUM_THREADS and torch.set_num_threads in each child process; 1 by default, since on a
  shared 2-core machine two OpenMP threads stall whenever one of them is descheduled).

Counting and timing, identical for both: tokens = non-padding input tokens per optimizer step (input_ids !=
pad); the first `--warmup` optimizer steps of each run are discarded; tokens/s = sum(tokens) / sum(seconds) over the
remaining steps. Start-up, data preparation and model loading are never timed.
- ours: `step_seconds` from output_dir/metrics.jsonl (top of the step loop -> after optimizer.step, including
  batch collation; excluding the metrics write); tokens = tokens_per_second x step_seconds.
- TRL: the primary time is on_step_end -> next on_step_end (a callback), which covers the whole loop: the
  dataloader fetch and collation, forward/backward, clipping, optimizer, and TRL's per-step logging. The
  column "TRL core" is on_step_begin -> on_step_end (no dataloader fetch, no logging), a lower bound on TRL's time.
  Tokens are counted in `training_step` from the batch the model actually receives.
- both: "tokens/CPU-s" uses the process CPU time between consecutive step ends (ours: at each per-step metrics
  write, TRL: at on_step_end). Unlike wall time it hardly moves when other jobs load the machine; prefer it there.
- `--repeats N` runs each trainer N times in alternating order (ours, TRL, TRL, ours, ...) and pools the steps.
- check: with packing=false both see the same rows in the same order, so their per-step losses must agree (printed).

Settings with no exact equal (also printed):
- packing: ours packs examples best-fit-decreasing into rows of max_length and right-pads the batch (position ids
  restart per document; transformers builds a block-diagonal mask per row). TRL packs best-fit-decreasing ("bfd")
  and, as TRL always does with bfd, trains padding-free: the batch's rows are flattened into ONE sequence of
  batch x max_length tokens with restarting position ids. With sdpa (no flash-attention on CPU) attention then
  costs (batch x L)^2 instead of batch x L^2. That is TRL's own behaviour for packing=true on this hardware.
- TRL computes the loss through its fused LM head (chunked log-softmax over the hidden states, plus entropy and
  top-1 metrics); ours builds the logits of the labelled positions and takes cross-entropy.

    .venv/bin/python bench/sft_throughput.py                        # defaults: a few minutes on 2 cores
    .venv/bin/python bench/sft_throughput.py --steps 20 --batch-size 16 --hidden-size 384
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from harness import (add_common_arguments, parameter_count, record_step_cpu_times, run_child,
                     run_order, run_benchmark, step_cpu_seconds, tiny_model)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------------
# Shared set-up
# ---------------------------------------------------------------------------------------------------------------------

def running_sum_records(count: int, seed: int, min_terms: int, max_terms: int) -> list[dict]:
    """Chat records: 'Add up: a + b + ...' -> 'a+b=s1, s1+c=s2, ... Answer: total.' (~100-230 characters)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        numbers = [rng.randint(10, 99) for _ in range(rng.randint(min_terms, max_terms))]
        total, steps = numbers[0], []
        for number in numbers[1:]:
            steps.append(f"{total}+{number}={total + number}")
            total += number
        records.append({"prompt": "Add up: " + " + ".join(map(str, numbers)),
                        "completion": ", ".join(steps) + f". Answer: {total}."})
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Children: one training run each, results as JSON
# ---------------------------------------------------------------------------------------------------------------------


def run_ours(spec: dict) -> dict:
    import runpy

    out = Path(spec["output_dir"])
    overrides = [
        f"model_name_or_path={spec['model_dir']}", f"dataset_id_or_path={spec['data_file']}", f"output_dir={out}",
        "eval_split_ratio=0", "do_eval=false", "shuffle=false", "completion_only_training=true",
        f"max_steps={spec['max_steps']}", f"train_batch_size={spec['batch_size']}",
        f"per_device_train_batch_size={spec['batch_size']}", f"learning_rate={spec['learning_rate']}",
        "lr_scheduler_type=constant", "warmup_ratio=0", "weight_decay=0", "max_grad_norm=1.0",
        f"max_seq_length={spec['max_length']}", f"packing={str(spec['packing']).lower()}",
        "bf16=false", "gradient_checkpointing=false", "torch_dtype=float32", "attn_implementation=sdpa",
        "logging_steps=1", "save_steps=0", f"seed={spec['seed']}", "report_to=[]",
    ]
    sys.argv = ["train_sft.py", "--config", str(ROOT / "configs/recipe/default.yaml"), *overrides]
    cpu_marks = record_step_cpu_times()
    runpy.run_path(str(ROOT / "train_sft.py"), run_name="__main__")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r]
    return {"seconds": [r["step_seconds"] for r in steps], "cpu_seconds": step_cpu_seconds(cpu_marks),
            "tokens": [round(r["tokens_per_second"] * r["step_seconds"]) for r in steps],
            "loss": [r["loss"] for r in steps]}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line)["messages"] for line in Path(spec["data_file"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in records])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.previous_end = 0.0
            self.cpu_marks: list[float] = []
            self.loop, self.core, self.tokens, self.loss = [], [], [], []
            self.pending_tokens = 0

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
            self.tokens.append(self.pending_tokens)
            self.pending_tokens = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss.append(logs["loss"])

    timer = StepTimes()

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            timer.pending_tokens += int((inputs["input_ids"] != tokenizer.pad_token_id).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    config = SFTConfig(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["learning_rate"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_length=spec["max_length"], packing=spec["packing"], completion_only_loss=True,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"],
        train_sampling_strategy="sequential",
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    trainer = CountingSFTTrainer(model=spec["model_dir"], args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"seconds": timer.loop, "core_seconds": timer.core, "cpu_seconds": step_cpu_seconds(timer.cpu_marks),
            "tokens": timer.tokens, "loss": timer.loss}


def child_main(kind: str, spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    result = run_ours(spec) if kind == "ours" else run_trl(spec)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result_file"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build model and data, run the four children, print the table
# ---------------------------------------------------------------------------------------------------------------------

def summarise(runs: list[dict], warmup: int) -> dict:
    """Pool the measured steps of every repeat."""
    tokens = [t for run in runs for t in run["tokens"][warmup:]]
    seconds = [s for run in runs for s in run["seconds"][warmup:]]
    if not seconds:
        raise RuntimeError(f"no steps left after discarding {warmup} warm-up steps; raise --steps")
    summary = {"steps": len(seconds), "tokens_per_step": sum(tokens) / len(tokens),
               "median_tokens_per_second": statistics.median(t / s for t, s in zip(tokens, seconds)),
               "seconds_per_step": sum(seconds) / len(seconds), "tokens_per_second": sum(tokens) / sum(seconds)}
    cpu_seconds = [s for run in runs for s in run["cpu_seconds"][warmup:]]
    summary["cpu_tokens_per_second"] = sum(tokens) / sum(cpu_seconds)
    if "core_seconds" in runs[0]:
        summary["core_tokens_per_second"] = sum(tokens) / sum(s for run in runs for s in run["core_seconds"][warmup:])
    return summary


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (packed rows with packing)")
    parser.add_argument("--max-length", type=int, default=512, help="max tokens per row (<= 512, the model's limit)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--packing", choices=["both", "false", "true"], default="both")
    return parser.parse_args()


def write_records(args, tmp: Path) -> Path:
    records = running_sum_records(args.records, args.seed, min_terms=5, max_terms=14)
    data_file = tmp / "records.jsonl"
    data_file.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["completion"]}]}) + "\n" for r in records))
    return data_file


def run_all(args, tmp: Path, model_dir: Path, data_file: Path, packings: list) -> dict:
    """Every (packing, repeat, trainer) run in its own process, alternating the trainers' order."""
    results: dict[tuple[bool, str], list[dict]] = {}
    for packing in packings:
        for repeat, kind in run_order(args.repeats):
            name = f"{kind}_packing_{packing}_{repeat}"
            spec = {"model_dir": str(model_dir), "data_file": str(data_file), "output_dir": str(tmp / name),
                    "result_file": str(tmp / f"{name}.json"), "max_steps": args.warmup + args.steps,
                    "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                    "max_length": args.max_length, "packing": packing, "seed": args.seed, "threads": args.threads}
            results.setdefault((packing, kind), []).append(run_child(__file__, kind, name, spec, tmp, args.threads))
    return results


def report(args, model_dir: Path, results: dict, packings: list) -> None:
    print(f"\nmodel: Llama hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, "
          f"{parameter_count(model_dir) / 1e6:.2f}M parameters, float32, sdpa; {args.records} running-sum chat records")
    print(f"batch {args.batch_size} rows/step, max_length {args.max_length}, lr {args.learning_rate} constant, "
          f"{args.threads} threads; {args.warmup} warm-up steps discarded, {args.steps} measured")
    print("tokens = non-padding input tokens per optimizer step; ours: sum(step_seconds), TRL: on_step_end to "
          "on_step_end (TRL core: on_step_begin to on_step_end);\nCPU-s: process CPU time between consecutive "
          "step ends (both), robust to other load on a shared machine\n")
    header = (f"{'packing':8s} {'trainer':8s} {'tokens/step':>11s} {'s/step':>8s} {'tokens/s':>10s} "
              f"{'TRL core tok/s':>14s} {'tokens/CPU-s':>12s} {'peak RSS MiB':>12s} {'ours/TRL':>9s}")
    print(header)
    print("-" * len(header))
    for packing in packings:
        ours = summarise(results[(packing, "ours")], args.warmup)
        trl_ = summarise(results[(packing, "trl")], args.warmup)
        ratio = ours["tokens_per_second"] / trl_["tokens_per_second"]
        for kind, summary in (("ours", ours), ("trl", trl_)):
            core = summary.get("core_tokens_per_second")
            peak = max(run["peak_rss_mib"] for run in results[(packing, kind)])
            print(f"{str(packing).lower():8s} {kind:8s} {summary['tokens_per_step']:11.0f} "
                  f"{summary['seconds_per_step']:8.3f} {summary['tokens_per_second']:10.0f} "
                  f"{'' if core is None else f'{core:.0f}':>14s} {summary['cpu_tokens_per_second']:12.0f} "
                  f"{peak:12.0f} "
                  f"{f'{ratio:.2f}' if kind == 'ours' else '':>9s}")
        core_ratio = ours["tokens_per_second"] / trl_["core_tokens_per_second"]
        median_ratio = ours["median_tokens_per_second"] / trl_["median_tokens_per_second"]
        cpu_ratio = ours["cpu_tokens_per_second"] / trl_["cpu_tokens_per_second"]
        print(f"{'':8s} ours/TRL tokens/s: {ratio:.2f} (median of per-step rates: {median_ratio:.2f}, "
              f"vs TRL core: {core_ratio:.2f}); tokens per CPU-second: {cpu_ratio:.2f}")
    if False in packings:  # same rows in the same order: the per-step losses must agree
        ours_loss, trl_loss = results[(False, "ours")][0]["loss"], results[(False, "trl")][0]["loss"]
        gap = max(abs(a - b) for a, b in zip(ours_loss, trl_loss))
        print(f"check, packing=false: same batches -> per-step loss max |ours - TRL| = {gap:.2e} over "
              f"{min(len(ours_loss), len(trl_loss))} steps (step 1: {ours_loss[0]:.4f} vs {trl_loss[0]:.4f})")
    print("\nnot equal by construction: TRL packing=true is best-fit-decreasing and padding-free (one flattened "
          "sequence per batch,\nattention over batch x max_length tokens under sdpa); ours packs best-fit-decreasing into "
          "padded rows. TRL's loss uses its fused LM head.")


def measure(args, tmp: Path) -> None:
    model_dir = tiny_model(tmp, args)
    packings = {"both": [False, True], "false": [False], "true": [True]}[args.packing]
    results = run_all(args, tmp, model_dir, write_records(args, tmp), packings)
    report(args, model_dir, results, packings)


def main() -> None:
    run_benchmark(parse_args(), child_main, "bench_sft_", measure)


if __name__ == "__main__":
    main()
