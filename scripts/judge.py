"""Score a JSONL of trajectory records with a RIM reward-system file, before paying for a run.

    python scripts/judge.py --reward-system configs/reward_system/interpretation_offline.yaml \
        --input records.jsonl [--cache outputs/judge_cache.sqlite | --no-cache] \
        [--set models.api_base=http://127.0.0.1:8000/v1 --set models.small_model=openai/my-judge] \
        [--output scores.jsonl] [--batch-size 64]

Each input line is a JSON object with any of: question, student_answer, ground_truth,
student_plan, teacher_guidance, student_trace. Prints each record's reward and per-judge scores,
then per-judge means, escalations, failed calls, cache hits, latency and total cost in USD.
Repeated runs with the cache on do not pay twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.judge_schema import reward_system_dict  # noqa: E402
from common.judge_verdicts import TRAJECTORY_FIELDS, Trajectory  # noqa: E402
from common.judges import RIMReward  # noqa: E402


def read_records(path: Path) -> list[Trajectory]:
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{lineno}: not JSON ({err})")
        if not isinstance(obj, dict):
            raise SystemExit(f"{path}:{lineno}: expected a JSON object")
        unknown = sorted(set(obj) - set(TRAJECTORY_FIELDS))
        if unknown:
            raise SystemExit(f"{path}:{lineno}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"expected any of {', '.join(TRAJECTORY_FIELDS)}")
        records.append(Trajectory(**{k: None if v is None else str(v) for k, v in obj.items()}))
    return records


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward-system", required=True, help="reward-system YAML (relative: to the repo root)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL of trajectory records")
    parser.add_argument("--cache", default="outputs/judge_cache.sqlite", help="SQLite reply cache")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a reward-system key (dotted, value parsed as YAML); repeatable")
    parser.add_argument("--output", type=Path, help="write per-record results as JSONL")
    parser.add_argument("--batch-size", type=int, default=64, help="records per concurrent batch")
    args = parser.parse_args(argv)

    records = read_records(args.input)
    overrides = args.set + (["cache=false"] if args.no_cache else [])
    reward = RIMReward(args.reward_system, cache_path=args.cache, overrides=overrides)
    judges = reward.config.judges
    models = reward.config.models
    print(f"reward system {reward.source}: judges {', '.join(judges)}; small {models.small_model}, "
          f"large {models.large_model}, temperatures {reward.config.temperatures}")

    results = []
    for start in range(0, len(records), args.batch_size):
        results += reward.score(records[start:start + args.batch_size])
    metrics = reward.pop_metrics()
    reward.close()

    print("\n" + "  ".join([f"{'record':>6}", f"{'reward':>7}"] + [f"{j:>12}" for j in judges]))
    for index, result in enumerate(results, start=1):
        cells = []
        for judge in judges:
            judged = result.judges.get(judge)
            mark = "" if judged is None or not judged.escalated else "*"
            cells.append(f"{(fmt(judged.score) if judged else 'n/a') + mark:>12}")
        note = "  capped" if result.capped else ""
        print("  ".join([f"{index:>6}", f"{fmt(result.reward):>7}"] + cells) + note)
    print("(* escalated to the large model; - no valid verdict; n/a judge does not apply; capped: anti-gaming cap)")

    print(f"\n{'judge':<12} {'mean':>6} {'scored':>8} {'escalated':>10}")
    for judge in judges:
        judged = [r.judges[judge] for r in results if judge in r.judges]
        scores = [j.score for j in judged if j.score is not None]
        mean = sum(scores) / len(scores) if scores else None
        print(f"{judge:<12} {fmt(mean):>6} {f'{len(scores)}/{len(judged)}':>8} {sum(j.escalated for j in judged):>10}")

    m = lambda key: metrics.get(f"judge/{key}", 0.0)  # noqa: E731
    print(f"\n{'records':<18}{len(results)}")
    print(f"{'unscored records':<18}{int(m('unscored'))}")
    print(f"{'capped records':<18}{int(m('capped'))}")
    print(f"{'calls':<18}{int(m('calls'))} ({int(m('requests'))} requests, {int(m('retries'))} retries)")
    print(f"{'failed calls':<18}{int(m('failures'))}")
    print(f"{'escalations':<18}{int(m('escalations'))} ({m('escalation_rate'):.0%} of judge evaluations)")
    print(f"{'cache hits':<18}{int(m('cache_hits'))}")
    if "judge/latency_p50" in metrics:
        print(f"{'latency p50/p95':<18}{m('latency_p50'):.2f} s / {m('latency_p95'):.2f} s")
    unpriced = int(m("unpriced_calls"))
    print(f"{'total cost':<18}${m('cost_usd'):.6f}" + (f" ({unpriced} replies without a litellm price)" if unpriced else ""))

    if args.output:
        with args.output.open("w") as out:
            for record, result in zip(records, results):
                out.write(json.dumps({"record": dataclasses.asdict(record), **dataclasses.asdict(result)}) + "\n")
        with args.output.with_suffix(".reward_system.yaml").open("w") as out:
            import yaml

            yaml.safe_dump(reward_system_dict(reward.config), out, sort_keys=False)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
