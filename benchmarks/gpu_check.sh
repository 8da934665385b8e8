#!/usr/bin/env bash
# GPU check (for a machine with a GPU, not CI): the smoke preset on the GPU, then the embedding
# benchmark on one GPU. Prints JSON lines; finishes within ~8 minutes on one modern GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
start=$(date +%s)
"$PY" -c "import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
"$PY" jobs/full_pipeline.py --preset smoke --use-gpu true --num-workers 1 --output "$out" --run-id gpu-smoke
"$PY" -c "import json,sys; m=json.load(open('$out/gpu-smoke/metrics.json')); print(json.dumps({'smoke_gpu': 'ok', 'classifier.test_mean_accuracy': m['classifier.test_mean_accuracy'], 'siamese.dot_r2': m['siamese.dot_r2']}))"
"$PY" benchmarks/embed_throughput.py --n 20000 --size 64 --use-gpu --batch-size 1024
echo "{\"gpu_check_seconds\": $(( $(date +%s) - start ))}"
