"""Held-out generation eval: greedy completions on eval prompts, scored by a registered reward function."""
from __future__ import annotations

from typing import Optional

from common.data import Example, encode_prompt, render_prompt
from common.rewards import RewardFunction, RewardInput


def build_reward_inputs(examples: list[Example], completions: list[str], prompts: list[str]) -> list[RewardInput]:
    return [RewardInput(prompt=p, completion=c, ground_truth=e.ground_truth, messages=e.prompt,
                        metadata=e.metadata) for e, c, p in zip(examples, completions, prompts)]


def greedy_eval(accelerator, model, tokenizer, examples: list[Example], reward_fn: RewardFunction,
                max_new_tokens: int, max_samples: Optional[int] = None, batch_size: int = 64, engine=None) -> dict:
    """Mean reward of greedy completions (for 0/1 rewards: accuracy). Every rank takes a shard; all ranks must
    call it together. `reward_fn` is a reward function (see common/rewards.py). `engine` (a rollout engine holding
    `model`'s weights, e.g. the vLLM one) samples instead of transformers generate on `model`.

    Returns {"accuracy", "num_samples", "num_scored", "examples": first few rows}.
    """
    from accelerate.utils import gather_object

    from common.rollout import HFGenerateEngine, SamplingParams

    examples = examples[:max_samples] if max_samples else examples
    local = examples[accelerator.process_index::accelerator.num_processes]
    prompts = [render_prompt(tokenizer, e.prompt) for e in local]
    prompt_ids = [encode_prompt(tokenizer, e.prompt) for e in local]
    if engine is None:
        engine = HFGenerateEngine(model, tokenizer, accelerator=accelerator, batch_size=batch_size)
    rollouts = engine.generate(prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    completions = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
    scores = reward_fn(build_reward_inputs(local, completions, prompts)) if local else []
    rows = [{"prompt": p, "completion": c, "ground_truth": e.ground_truth, "score": s}
            for p, c, e, s in zip(prompts, completions, local, scores)]
    rows = gather_object(rows)
    scored = [r["score"] for r in rows if r["score"] is not None]
    return {"accuracy": sum(scored) / len(scored) if scored else float("nan"), "num_samples": len(rows),
            "num_scored": len(scored), "examples": rows[:5]}


def generation_accuracy(accelerator, cfg, model, tokenizer, examples: list[Example], engine=None) -> dict:
    """greedy_eval scored by the config's `eval_generation_reward`, on `eval_generation_samples` examples with
    `eval_max_new_tokens` (SFT and GKD)."""
    from common.rewards import get_reward_factory
    reward_fn = get_reward_factory(cfg.eval_generation_reward)(cfg)
    return greedy_eval(accelerator, model, tokenizer, examples, reward_fn, cfg.eval_max_new_tokens,
                       cfg.eval_generation_samples, engine=engine)


def start_rows(output_dir: str, model_name: str, start_step: int, start_eval: Optional[dict]) -> list[tuple[str, dict]]:
    """The "before" rows of a before/after table, labelled by what was evaluated. After a resume, the true start's
    numbers are read back from metrics.jsonl (its step-0 eval row), and the resumed checkpoint's eval is its own row."""
    import json
    from pathlib import Path

    rows = []
    if start_step > 0:
        path = Path(output_dir) / "metrics.jsonl"
        first = next((r for r in map(json.loads, path.read_text().splitlines() if path.is_file() else [])
                      if r.get("step") == 0 and isinstance(r.get("eval/reward"), float)), None)
        if first is not None:
            rows.append((f"start ({model_name}; from metrics.jsonl)",
                         {"accuracy": first["eval/reward"], "num_scored": first.get("eval/num_samples", "?")}))
    if start_eval is not None:
        rows.append((f"start ({model_name})" if start_step == 0 else f"resumed checkpoint (step {start_step})",
                     start_eval))
    return rows


def format_accuracy_table(rows: list[tuple[str, dict]]) -> str:
    """[(label, greedy_eval result)] -> a small Markdown table."""
    lines = ["| model | held-out greedy accuracy | samples |", "|---|---|---|"]
    for label, result in rows:
        lines.append(f"| {label} | {100 * result['accuracy']:.1f} % | {result['num_scored']} |")
    return "\n".join(lines)
