#!/usr/bin/env bash
# Install one of the requirement sets into the active environment:
#   bash scripts/install.sh          # requirements.txt      (training on CPU or GPU, no vLLM)
#   bash scripts/install.sh dev      # requirements-dev.txt  (+ tests: pytest, TRL, vLLM's CPU build)
#   bash scripts/install.sh gpu      # requirements-gpu.txt  (CUDA machines: vLLM for GPUs)
# vLLM pulls torchvision, torchaudio and torchcodec. On a CPU torch the registry's builds of those are linked
# against CUDA torch and break `import vllm` ("operator torchvision::nms does not exist"); text models need none
# of them, so they are removed when they do not import.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "")  requirements=requirements.txt ;;
  dev) requirements=requirements-dev.txt ;;
  gpu) requirements=requirements-gpu.txt ;;
  *)   echo "usage: bash scripts/install.sh [dev|gpu]" >&2; exit 2 ;;
esac
python -m pip install -q -r "$requirements"
for package in torchvision torchaudio torchcodec; do
  if python -m pip show -q "$package" >/dev/null 2>&1 && ! python -c "import $package" >/dev/null 2>&1; then
    echo "install.sh: removing $package (built for another torch: $(python -c 'import torch; print(torch.__version__)'))"
    python -m pip uninstall -y -q "$package"
  fi
done
