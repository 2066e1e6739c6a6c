#!/usr/bin/env bash
# CPU quickstart: build tiny models, teach one 2-digit addition with SFT, improve it with GRPO against a verifier,
# then distil it into a smaller student with GKD. Each step prints a held-out accuracy table.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# one thread per process: tiny models gain nothing from more, and oversubscribed cores stall badly
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python scripts/make_tiny_model.py --output tiny_models/llama-tiny
python scripts/make_tiny_model.py --output tiny_models/llama-tiny-student --hidden-size 64 --layers 2
# a re-run replaces the previous quickstart's outputs (a training run refuses that unless told to)
python train_sft.py --config configs/recipe/quickstart_sft.yaml overwrite_output_dir=true
python train_grpo.py --config configs/recipe/quickstart_grpo.yaml overwrite_output_dir=true
python train_gkd.py --config configs/recipe/quickstart_gkd.yaml overwrite_output_dir=true
