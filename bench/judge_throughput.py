"""Judge throughput: 256 judge calls through litellm against a local OpenAI-compatible server.

    .venv/bin/python bench/judge_throughput.py [--calls 256] [--latency 0.2] [--workers 32] [--processes N]

The server (tests/openai_stub_server.py, in its own process as a provider would be) answers
every request after `--latency` seconds. The
ideal wall time with `--workers` calls in flight is calls * latency / workers (1.6 s at the
defaults); the script prints measured / ideal (goal <= 1.3) and the most requests the server saw
at once, and the CPU seconds of this process, its judge client processes (`--processes`, default
the preset's `parallel_execution.client_processes`) and the server. One small untimed batch first
warms litellm's clients (their one-off setup is printed too).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from common import judge_client  # noqa: E402
from common.judge_schema import JUDGE_NAMES, load_reward_system  # noqa: E402
from common.judge_verdicts import Trajectory  # noqa: E402
from common.judges import RIMReward  # noqa: E402
from openai_stub_server import verdict  # noqa: E402


def server_stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_s() -> tuple[float, float]:
    """CPU seconds of (this process, its judge client processes)."""
    return time.process_time(), sum(cpu_s(w.process.pid) for pool in judge_client._POOLS.values() for w in pool.workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--model", default="openai/gpt-4o-mini",
                        help="judge model name sent to the server; the default is in litellm's price map, as the "
                             "spec's Gemini judges are (an unknown name costs ~1.5 ms more CPU per call: litellm "
                             "searches its price map by pattern on every reply)")
    parser.add_argument("--processes", type=int, default=None,
                        help="parallel_execution.client_processes (default: the preset's)")
    args = parser.parse_args()
    judges_per_record = len(JUDGE_NAMES)        # one temperature: one call per judge and record
    if args.calls % judges_per_record:
        raise SystemExit(f"--calls must be a multiple of {judges_per_record}")

    server = subprocess.Popen([sys.executable, str(REPO / "tests/openai_stub_server.py"), "--latency", str(args.latency),
                               "--content", verdict(0.6, 0.1)], stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        config = load_reward_system(REPO / "configs/reward_system/interpretation.yaml", [
            f"models.api_base={base_url}", f"models.small_model={args.model}",
            "models.large_model=openai/bench-large", "temperatures=[0.2]", "cache=false",
            f"parallel_execution.max_workers={args.workers}"]
            + ([f"parallel_execution.client_processes={args.processes}"] if args.processes else []))
        reward = RIMReward(config)
        processes = config.parallel_execution.client_processes

        def batch(n: int, tag: str) -> list[Trajectory]:
            return [Trajectory(question=f"{tag} question {i}", student_answer=str(i), ground_truth=str(i + 1),
                               student_plan="plan", teacher_guidance="guidance") for i in range(n)]

        start = time.perf_counter()
        reward.score(batch(1, "warmup"))        # imports litellm, builds its HTTP client
        warmup_s = time.perf_counter() - start
        before = server_stats(base_url)["requests"]
        reward.pop_metrics()

        start, client_start, server_start = time.perf_counter(), client_cpu_s(), cpu_s(server.pid)
        results = reward.score(batch(args.calls // judges_per_record, "timed"))
        wall_s = time.perf_counter() - start
        (main_s, children_s), server_s = client_cpu_s(), cpu_s(server.pid) - server_start
        main_s, children_s = main_s - client_start[0], children_s - client_start[1]
        metrics = reward.pop_metrics()
        stats = server_stats(base_url)
    finally:
        server.terminate()
        server.wait()

    assert stats["requests"] - before == args.calls and all(r.reward is not None for r in results)
    assert metrics["judge/escalations"] == 0 and metrics["judge/failures"] == 0
    ideal_s = args.calls * args.latency / args.workers
    print(f"warm-up batch ({judges_per_record} calls: litellm import, client setup): {warmup_s:.2f} s")
    print(f"{args.calls} calls, {args.latency * 1000:.0f} ms each, max_workers {args.workers}, "
          f"client_processes {processes}: "
          f"wall {wall_s:.2f} s, ideal {ideal_s:.2f} s, wall/ideal {wall_s / ideal_s:.2f} (goal <= 1.3); "
          f"server max in flight {stats['max_in_flight']}; CPU: this process {main_s:.2f} s, client processes {children_s:.2f} s, server {server_s:.2f} s; latency p50 {metrics['judge/latency_p50']:.3f} s, "
          f"p95 {metrics['judge/latency_p95']:.3f} s")


if __name__ == "__main__":
    main()
