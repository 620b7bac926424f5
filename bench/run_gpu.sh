#!/usr/bin/env bash
# The GPU benchmark set recorded in docs/BENCHMARKS.md ("GPU"), one stage per argument:
#
#   bash bench/run_gpu.sh OUT throughput augment latency
#
#   throughput  train step, JAX against PyTorch on CUDA (NCHW and channels_last), float32
#               (TF32 convolutions in both) at 128 (widths 16, 32) and 256 (widths 32, 64),
#               batch 16
#   augment     bench/augment.py: the jitted augmentation on the GPU, SciPy on the host
#   latency     bench/inference_latency.py: full-size IBU-Net on a 240-frame cine, float32 and
#               bfloat16 activations
#   bf16        the bfloat16 train-step comparison alone, 256 x 256, width 64
#   paper       main.py at the paper's scale (configs/unet.py, lnu.py, ibu.py: 256 x 256,
#               width 64, 100 epochs, seed 0), the three runs side by side on the one GPU,
#               evaluation every 10 epochs; workdirs OUT/paper_<model>
#
# Results go to OUT/<stage>*.json and OUT/<stage>*.log. Data: $LVSEG_DATA_DIR (default
# ../shared/data/scd).
set -euo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT STAGE...}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
for stage in "$@"; do
  echo "== $stage $(date -u +%FT%TZ)"
  case $stage in
    throughput)
      common=(--torch-formats nchw,channels_last --models unet,unet_bn,lnu,ibu
              --batch 16 --iters 30 --iters-256 30 --warmup 3)
      $py bench/train_throughput.py "${common[@]}" --sizes 128 --widths 16,32 \
        --json "$out/throughput_128.json" 2>&1 | tee "$out/throughput_128.log"
      $py bench/train_throughput.py "${common[@]}" --sizes 256 --widths 32,64 \
        --json "$out/throughput_256.json" 2>&1 | tee "$out/throughput_256.log"
      ;;
    augment)
      $py bench/augment.py --rounds 5 --inner 10 --json "$out/augment.json" 2>&1 \
        | tee "$out/augment.log"
      ;;
    bf16)
      $py bench/train_throughput.py --torch-formats nchw,channels_last \
        --models unet,unet_bn,lnu,ibu --batch 16 --iters 30 --iters-256 30 --warmup 3 \
        --sizes 256 --widths 64 --dtype bfloat16 --json "$out/throughput_256_bf16.json" 2>&1 \
        | tee "$out/throughput_256_bf16.log"
      ;;
    paper)
      for model in unet lnu ibu; do
        # Three processes share the GPU: each takes memory as it needs it.
        XLA_PYTHON_CLIENT_PREALLOCATE=false $py main.py --config="configs/$model.py" \
          --workdir="$out/paper_$model" --config.train.eval_every_epochs=10 \
          > "$out/paper_$model.log" 2>&1 &
      done
      wait
      tail -n 3 "$out"/paper_*.log
      ;;
    latency)
      $py bench/inference_latency.py --configs full,full-bf16 --repeats 2 \
        --json "$out/latency.json" 2>&1 | tee "$out/latency.log"
      ;;
    *)
      echo "unknown stage $stage (throughput | bf16 | augment | latency | paper)" >&2
      exit 2
      ;;
  esac
done
