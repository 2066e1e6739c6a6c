"""accelerate_configs/fsdp2.yaml on this CPU-only machine: accelerate (1.15) enables FSDP only for GPU
distributed types, so an FSDP launch without CUDA would start independent, unsynchronised processes (or, with
ACCELERATE_USE_CPU, plain DDP). The scripts refuse both with one `error:` line, exit 2, before any model loads and
before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port
from test_train_sft import sft_args


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the CPU-only behaviour")
@pytest.mark.parametrize("use_cpu,got", [(False, "no distributed training"), (True, "MULTI_CPU, not FSDP")])
def test_fsdp2_config_on_cpu_stops_with_one_clear_error(tiny_model_dir, tmp_path, use_cpu, got):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if use_cpu:  # accelerate would then run plain DDP and call it done
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                             "--config_file", "accelerate_configs/fsdp2.yaml", "--num_processes", "2",
                             "--mixed_precision", "no", "--main_process_port", str(free_port()),
                             *sft_args(tiny_model_dir, out, "max_steps=2", "train_batch_size=8",
                                       "per_device_train_batch_size=4")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    errors = sorted({line for line in result.stderr.splitlines() if line.startswith("error:")})
    assert errors == [f"error: 2 processes were launched with FSDP but accelerate set up {got} on this machine "
                      "(device cpu); accelerate's FSDP needs CUDA GPUs. On CPU use accelerate_configs/cpu_2proc.yaml "
                      "(DDP over gloo) or a DeepSpeed ZeRO config"], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # each worker; the launcher itself then reports the failure
    assert "common/runtime.py" not in result.stderr  # no traceback from the scripts
    assert not out.exists()
