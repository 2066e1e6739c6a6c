#!/usr/bin/env bash
# CPU quickstart: build a tiny model, teach it 2-digit addition with SFT, then print held-out accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python scripts/make_tiny_model.py --output tiny_models/llama-tiny
python train_sft.py --config configs/recipe/quickstart_sft.yaml
