#!/usr/bin/env bash
# GPU check (for a machine with a GPU, not CI): the smoke preset on the GPU (precision auto: bf16 where the
# GPU has it), then the embedding benchmark on one GPU at bf16 and fp32 side by side (its last keys are the
# bf16/fp32 ratios). Prints JSON lines; finishes within ~8 minutes on one modern GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
start=$(date +%s)
"$PY" -c "import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
"$PY" jobs/full_pipeline.py --preset smoke --use-gpu true --num-workers 1 --output "$out" --run-id gpu-smoke
"$PY" -c "import json,sys; m=json.load(open('$out/gpu-smoke/metrics.json')); s=json.load(open('$out/gpu-smoke/manifest.json'))['stages']; print(json.dumps({'smoke_gpu': 'ok', 'classifier.test_mean_accuracy': m['classifier.test_mean_accuracy'], 'siamese.dot_r2': m['siamese.dot_r2'], 'precision': {k: v.get('precision') for k, v in s.items() if 'precision' in v}}))"
"$PY" benchmarks/embed_throughput.py --n 20000 --size 64 --use-gpu --batch-size 1024
echo "{\"gpu_check_seconds\": $(( $(date +%s) - start ))}"
