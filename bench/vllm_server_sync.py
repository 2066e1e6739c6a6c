"""Weight sync to one vLLM server (vLLM's own OpenAI-compatible server, CPU build, gloo transport), in one run:
bucketed (several bucket sizes, one `/update_weights` request for the whole model) vs one request and one
broadcast per parameter (the way ATLAS and RLT push weights).

    python bench/vllm_server_sync.py                      # 6 layers, 32k vocabulary (fits a shared 24 GiB box)
    python bench/vllm_server_sync.py --layers 24 --vocab 151936   # the full Qwen2.5-0.5B shape

The model is a random Llama with Qwen2.5-0.5B's layer shapes (hidden 896, 14 / 2 heads, MLP 4864, tied head),
built and saved locally; the server is started by this script (its own process group, stopped at the end). Every
variant is a full sync (pause, start, transfer, finish with a version, reset prefix cache, resume, version check),
`--repeats` times; the best time is reported. After each variant the server's greedy output is checked against
the trainer's model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from vllm_sync import build_model  # noqa: E402  (the same random 0.5B-shaped model)


def start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--enable-scale-out", "--logprobs-mode", "processed_logprobs",
         "--worker-extension-cls", "common.vllm_server_worker.GlooWeightTransferExtension",
         "--weight-transfer-config", '{"backend": "gloo"}'],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start: {log.read_text()[-3000:]}")
            time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.rollout import HFGenerateEngine, SamplingParams
    from common.vllm_server import VLLMServerEngine, free_port

    work = Path(tempfile.mkdtemp(prefix="vllm_server_sync_"))
    build_model(work / "model", args.layers, args.vocab)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    with torch.no_grad():   # weights the server does not have yet, so a sync that drops one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    parameters = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters()) + 1   # + the tied head, sent under its own name
    port = free_port()
    server = start_server(work / "model", port, work / "server.log")
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    prompts = [tokenizer.encode(t) for t in ("12+30=", "hello")]
    expected = [r.completion_ids for r in HFGenerateEngine(model, tokenizer).generate(prompts, greedy)]
    rows, version = [], 0
    try:
        variants = [("per parameter: one request + one broadcast each", 0, True)] + \
            [(f"bucketed, {mb:g} MiB buckets, one request", int(mb * 2 ** 20), False) for mb in args.bucket_mb]
        engine = None
        for name, bucket_bytes, per_request in variants:
            if engine is None:
                engine = VLLMServerEngine([("127.0.0.1", port)], tokenizer, bucket_bytes=bucket_bytes,
                                          per_request=per_request)
            engine.bucket_bytes, engine.per_request = bucket_bytes, per_request
            best = None
            for _ in range(args.repeats):
                version += 1
                engine.sync_weights(model, version=version)
                if best is None or engine.last_sync["seconds"] < best["seconds"]:
                    best = dict(engine.last_sync)
            equal = [r.completion_ids for r in engine.generate(prompts, greedy)] == expected
            rows.append({"variant": name, "buckets": best["buckets"], "seconds": round(best["seconds"], 3),
                         "gb_per_s": round(best["gb_per_s"], 3), "greedy_equal": equal})
            print(json.dumps(rows[-1]), flush=True)
        engine.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)   # the saved model (2 GB at the full shape)
    baseline = rows[0]["seconds"]
    print(f"\n{parameters / 1e6:.0f}M parameters, {tensors} tensors, {parameters * 4 / 1e9:.2f} GB fp32\n")
    print("| variant | buckets | time | GB/s | time / per-parameter | greedy = trainer's |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['buckets']} | {row['seconds']:.2f} s | {row['gb_per_s']:.2f} | "
              f"{row['seconds'] / baseline:.2f}x | {row['greedy_equal']} |")


if __name__ == "__main__":
    main()
