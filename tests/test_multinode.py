"""The multi-node launch line of slurm/train.sbatch, for real on one host: two `accelerate launch` processes, one per
machine rank (`--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1 --main_process_port P`), one training
process each, train together (gloo) and take the same steps as a 2-process single-machine run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, aborted_in_transport, accelerate_launch, free_port, retry_args, side_by_side
from test_train_grpo import grpo_args
from test_train_sft import sft_args


class Finished:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def two_machine_launch(script_args: list[str], timeout: int = 600) -> Finished:
    """Machine ranks 0 and 1 of a 2-machine job on this host, as slurm/train.sbatch starts them on two nodes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for attempt in range(2):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                   "--mixed_precision", "no", "--num_machines", "2", "--num_processes", "2",
                                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                   "--main_process_port", str(port), *retry_args(script_args, attempt)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
        outputs = [p.communicate(timeout=timeout) for p in procs]
        result = Finished(max(abs(p.returncode) for p in procs), "\n".join(o for o, _ in outputs),
                          "\n--- machine rank 1 ---\n".join(e for _, e in outputs))
        if not aborted_in_transport(result):
            break
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]


def assert_same_run(two_machines: Path, one_machine: Path, keys: tuple[str, ...]):
    a = [r for r in metrics(two_machines) if "loss" in r]
    b = [r for r in metrics(one_machine) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in keys:
        assert [key in r for r in a] == [key in r for r in b], key
        assert [r[key] for r in a if key in r] == pytest.approx([r[key] for r in b if key in r], rel=1e-4, abs=1e-6)
    wa, wb = load_file(two_machines / "model.safetensors"), load_file(one_machine / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_sft_on_two_machines_matches_one_machine(tiny_model_dir, tmp_path):
    common = ["max_steps=4", "train_batch_size=8", "per_device_train_batch_size=4", "learning_rate=1e-2"]
    two, one = tmp_path / "two_machines", tmp_path / "one_machine"
    for result in side_by_side(lambda: two_machine_launch(sft_args(tiny_model_dir, two, *common)),
                               lambda: accelerate_launch(sft_args(tiny_model_dir, one, *common))):
        assert_ok(result)
    assert_same_run(two, one, ("loss", "grad_norm"))


def test_grpo_on_two_machines_matches_one_machine(tiny_model_dir, tmp_path):
    common = ["max_steps=2", "per_device_train_batch_size=16", "beta=0.04", "num_iterations=2"]
    two, one = tmp_path / "two_machines", tmp_path / "one_machine"
    for result in side_by_side(lambda: two_machine_launch(grpo_args(tiny_model_dir, two, *common)),
                               lambda: accelerate_launch(grpo_args(tiny_model_dir, one, *common))):
        assert_ok(result)
    assert_same_run(two, one, ("loss", "reward", "kl"))
