"""Check a runtime-traces export (`arc-atlas export` JSONL, plain/.gz/.xz) before training on it.

Prints the number of sessions and steps, which fields the sessions and steps carry, the reward distribution,
statuses, how many GRPO / SFT records the default filters keep, and the first GRPO prompt: rendered with the
tokenizer's chat template when --tokenizer is given, else as raw chat messages.

    python scripts/inspect_traces.py traces/export.jsonl --tokenizer Qwen/Qwen3-8B
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `common` lives at the repo root

from common.trace_sessions import load_sessions  # noqa: E402
from common.traces import DEFAULT_REVIEW_STATUSES, filter_reason, grpo_records, sft_records  # noqa: E402


def _distribution(name: str, scores: list[float], total: int) -> str:
    if not scores:
        return f"{name}: none recorded (0 of {total})"
    buckets = Counter(min(int(score * 10), 9) if 0.0 <= score <= 1.0 else "outside [0,1]" for score in scores)
    histogram = "  ".join(f"{b / 10:.1f}-{(b + 1) / 10:.1f}: {buckets[b]}" for b in range(10) if buckets[b])
    if buckets["outside [0,1]"]:
        histogram += f"  outside [0,1]: {buckets['outside [0,1]']}"
    return (f"{name}: {len(scores)} of {total} recorded; min {min(scores):.3f}  mean {statistics.fmean(scores):.3f}  "
            f"median {statistics.median(scores):.3f}  max {max(scores):.3f}\n    {histogram}")


def _field_counts(title: str, objects: list[dict]) -> str:
    counts = Counter(key for obj in objects for key in obj)
    lines = [f"{title} ({len(objects)}):"]
    lines += [f"    {key:<24} {n:>7}  ({100 * n / len(objects):.0f}%)" for key, n in sorted(counts.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="JSONL export (plain, .gz or .xz)")
    parser.add_argument("--tokenizer", help="tokenizer path or hub id whose chat template renders the prompt")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="skip",
                        help="skip (default here, so the report lists bad lines) or stop at the first bad line")
    args = parser.parse_args(argv)

    try:
        sessions, summary = load_sessions(args.file, args.on_bad_record)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    raw_sessions = [s.to_dict() for s in sessions]
    raw_steps = [step for s in raw_sessions for step in s["steps"]]
    steps_per_session = [len(s.steps) for s in sessions]
    print(f"sessions: {len(sessions)}   steps: {len(raw_steps)}   steps per session: min {min(steps_per_session)}"
          f"  mean {statistics.fmean(steps_per_session):.1f}  max {max(steps_per_session)}")
    print(_field_counts("session fields", raw_sessions))
    if raw_steps:
        print(_field_counts("step fields", raw_steps))
    print(_distribution("session reward", [s.reward_score for s in sessions if s.reward_score is not None],
                        len(sessions)))
    step_scores = [step.reward_score for s in sessions for step in s.steps if step.reward_score is not None]
    print(_distribution("step reward", step_scores, len(raw_steps)))
    for name, values in (("status", [s.status for s in sessions]),
                         ("review_status", [s.effective_review_status for s in sessions])):
        print(f"{name}: " + ", ".join(f"{v}: {n}" for v, n in Counter(map(str, values)).most_common()))

    review = set(DEFAULT_REVIEW_STATUSES)
    kept = [s for s in sessions if filter_reason(s, None, None, review) is None]
    grpo = [r for s in kept for r in grpo_records(s)]
    sft = [r for s in kept for r in sft_records(s)]
    print(f"with the default review_status_filters {list(DEFAULT_REVIEW_STATUSES)}: {len(kept)} sessions -> "
          f"{len(grpo)} grpo records, {len(sft)} sft records")

    first = grpo[0] if grpo else next((r for s in sessions for r in grpo_records(s)), None)
    if first is None:
        print("no steps in any session: no GRPO prompt to show")
        return 0
    print(f"\nfirst GRPO prompt ({first.metadata['source_file']}:{first.metadata['source_line']}, "
          f"step {first.metadata['step_id']}):")
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        print(tokenizer.apply_chat_template(first.prompt, tokenize=False, add_generation_prompt=True))
    else:
        print(json.dumps(first.prompt, ensure_ascii=False, indent=2))
    if first.ground_truth is not None:
        print(f"ground_truth: {first.ground_truth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
