"""Shared fixtures: a tiny local model + tokenizer (nothing downloaded), free ports, script runs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama with the character-level chat tokenizer, saved once per test session."""
    from make_tiny_model import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=64, layers=2, heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run a repo script in a fresh interpreter; returns the CompletedProcess (stdout+stderr text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def without_module(tmp_path: Path, module: str) -> dict:
    """Environment for run_python in which `import <module>` fails, as if it were not installed."""
    blocker = tmp_path / f"without_{module}"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    return {"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}


def side_by_side(*launches):
    """Independent launches (argument-less callables such as `lambda: run_python([...])`) run at the same time; their
    results in order. A launch is mostly single-threaded start-up (imports, model load), so two overlap on 2 cores;
    give each one thread (ONE_THREAD): several multi-threaded processes on 2 cores slow each other down badly."""
    with ThreadPoolExecutor(len(launches)) as pool:
        return [future.result() for future in [pool.submit(launch) for launch in launches]]


def runs_per_case(cases, args_for, root: Path) -> dict:
    """One run per (overrides, ...) case, side by side, one thread each: `args_for(output_dir, *overrides)` gives
    the script arguments. Returns overrides (a tuple) -> (output_dir, result)."""
    outs = {tuple(case[0]): root / f"never_{i}" for i, case in enumerate(cases)}
    results = side_by_side(*[lambda extra=extra, out=out: run_python(args_for(out, *extra), env=ONE_THREAD)
                             for extra, out in outs.items()])
    return {extra: (out, result) for (extra, out), result in zip(outs.items(), results)}


def accelerate_launch(script_args: list[str], num_processes: int = 2, extra_env: dict | None = None,
                      timeout: int = 600):
    """A real multi-process CPU run through `accelerate launch` (gloo), on a free port."""
    env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for attempt in range(2):
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port())]
        result = run_python([*launcher, *retry_args(script_args, attempt)], env=env, timeout=timeout)
        if not aborted_in_transport(result):
            break
    return result


def aborted_in_transport(result) -> bool:
    """A worker killed by SIGABRT ("terminate called without an active exception") inside the CPU gloo
    transport, seen ~1 run in 20 on this machine with plain DDP and DeepSpeed alike: retried once. A Python
    error (exit code 1) is not."""
    return "exitcode: -6" in result.stderr


def retry_args(script_args: list[str], attempt: int) -> list[str]:
    """The second attempt after a transport abort replaces what the first one wrote (a fresh run's output_dir
    then holds a run); a resumed run is retried as it is."""
    if attempt == 0 or any(arg.startswith("resume_from_checkpoint=") for arg in script_args):
        return script_args
    return [*script_args, "overwrite_output_dir=true"]


def deepspeed_launch(script_args: list[str], zero_stage: int, num_processes: int = 2, timeout: int = 600):
    """A real DeepSpeed run on CPU (gloo). Not ACCELERATE_USE_CPU: with it accelerate never selects DeepSpeed."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for attempt in range(2):
        launcher = ["-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(zero_stage),
                    "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--main_process_port", str(free_port())]
        result = subprocess.run([sys.executable, *launcher, *retry_args(script_args, attempt)], cwd=ROOT, env=env,
                                capture_output=True,
                                text=True, timeout=timeout)
        if not aborted_in_transport(result):
            break
    return result
