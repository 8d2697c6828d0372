#!/usr/bin/env bash
# One short GPU check (under 10 minutes on an H100/H200): speed of the training loops, inference and memory, a
# profile of one `fast_bf16` iteration (top operators and a Chrome trace), the compiled loop, then the `cpu` preset's
# quality in float32 and with the GPU switches (configs/presets/gpu.json), and the paper preset for as long as the
# budget allows. Every stage has its own time limit, so a failing stage costs only its own result. Logs and tables
# go to $OUT (default: runs/gpu_check).
#
#   bash scripts/benchmark_gpu.sh                      # data in ../shared/data/kermany_pneumonia
#   QUALITY_MINUTES=5 bash scripts/benchmark_gpu.sh  # wall-clock budget of each training run
set -u
OUT=${OUT:-runs/gpu_check}
DATA_ROOT=${DATA_ROOT:-../shared/data}
QUALITY_MINUTES=${QUALITY_MINUTES:-2}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs/gpu_quality
log="$OUT/speed.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"

stage() {  # stage SECONDS ARGS...: one benchmark_speed.py run
    local limit=$1
    shift
    echo "### benchmark_speed.py $*" | tee -a "$log"
    timeout "$limit" "$PY" scripts/benchmark_speed.py --device cuda "$@" 2>&1 | tee -a "$log" | tail -12
    echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}
stage 110 --preset paper --batch 32 --repeats 3 --iters 10 --loops authors engine fast fast_bf16 \
    --json "$OUT/speed_train.json"
stage 30 --preset paper --inference --repeats 5 --json "$OUT/speed_inference.json"
stage 50 --preset paper --batch 32 --memory --loops authors fast fast_bf16 --json "$OUT/speed_memory.json"
stage 40 --preset paper --batch 32 --profile fast_bf16 --rows 30 --trace "$OUT/trace_fast_bf16.json"
stage 100 --preset paper --batch 32 --repeats 2 --iters 10 --loops fast_bf16 fast_bf16_compiled \
    --json "$OUT/speed_compiled.json"

# quality: runs in parallel on the one GPU (each stops after QUALITY_MINUTES of training, then evaluates)
quality() {  # quality NAME ARGS...
    local name=$1
    shift
    timeout $((${QUALITY_MINUTES%.*} * 60 + 180)) "$PY" scripts/benchmark_quality.py --data_root "$DATA_ROOT" \
        --datasets kermany_pneumonia --out_root runs/gpu_quality --csv "runs/gpu_quality/$name/results.csv" \
        --max_minutes "$QUALITY_MINUTES" "$@" >"$OUT/quality_$name.log" 2>&1
    echo "### quality $name: exit $?" | tee -a "$log"
}
for v in sagan sagan_gpu; do
    for s in 0 1; do
        mkdir -p "runs/gpu_quality/${v}_s$s"
        quality "${v}_s$s" --variants "$v" --preset cpu --seeds "$s" --num_workers 2 &
    done
done
mkdir -p runs/gpu_quality/paper
quality paper --variants sagan_gpu --preset paper --seeds 0 --iterations 100000 --val_interval 500 \
    --num_workers 4 &
wait
tar -czf "$OUT/quality.tar.gz" --exclude='*.pt' --exclude='tb' runs/gpu_quality "$OUT"/quality_*.log
cat runs/gpu_quality/*/results.csv | tee -a "$log"
