#!/usr/bin/env bash
# GPU check (a machine with a GPU, not CI). Prints JSON lines.
#  1. The paper recipe (--preset paper: the paper's method at 178 px) on a synthetic CelebA-format folder of
#     N images (default 3000) with short epochs, on one GPU: per stage its seconds, images/s, rank 0's peak
#     GPU memory and precision, and the nodes it ran on.
#  2. The embedding benchmark at bf16 and fp32 side by side (its last keys are the bf16/fp32 ratios).
# About 10 minutes on one modern GPU. N=... EPOCHS=... override the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-3000}
EPOCHS=${EPOCHS:-2}
out=$(mktemp -d)
start=$(date +%s)
"$PY" -c "import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'torch': torch.__version__}))"
"$PY" -c "from olr_ray.data import synthetic; synthetic.write_celeba_folder('$out/faces', n=$N, size=178, seed=0)"
"$PY" jobs/full_pipeline.py --preset paper --data "$out/faces" --use-gpu true --num-workers 1 \
    --output "$out/runs" --run-id gpu-paper classifier.epochs="$EPOCHS" siamese.epochs="$EPOCHS" \
    decoder.epochs="$EPOCHS" analysis.edit_images=64 analysis.disentangle_faces=64
"$PY" - "$out/runs/gpu-paper" <<'PY'
import json, sys
run = sys.argv[1]
m, st = json.load(open(f"{run}/metrics.json")), json.load(open(f"{run}/manifest.json"))["stages"]
splits = st["data"]["splits"]
seen = {"data": sum(splits.values()), "classifier": splits["train"] * st["classifier"]["epochs"],  # images per stage
        "siamese": 2 * st["siamese"].get("pairs_last_epoch", 0) * st["siamese"]["epochs"],
        "embed": st["embed"]["rows"], "decoder": splits["train"] * st["decoder"]["epochs"]}
per_stage = {name: {"seconds": s.get("seconds"), "images_per_s": round(seen[name] / s["seconds"], 1) if name in seen
                    else None, "gpu_peak_mb": s.get("gpu_peak_mb"), "precision": s.get("precision"),
                    "nodes": len(s.get("nodes", []))} for name, s in st.items()}
print(json.dumps({"paper_gpu": per_stage, "classifier.test_mean_accuracy": m.get("classifier.test_mean_accuracy"),
                  "siamese.dot_r2": m.get("siamese.dot_r2"), "images": sum(splits.values()), "image_size": 178}))
PY
"$PY" benchmarks/embed_throughput.py --n 20000 --size 64 --use-gpu --batch-size 1024
echo "{\"gpu_check_seconds\": $(( $(date +%s) - start ))}"
