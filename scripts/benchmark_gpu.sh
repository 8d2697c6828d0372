#!/usr/bin/env bash
# One short GPU check (under 10 minutes on an H100/H200), in stages, each with its own time limit so that a failing
# stage costs only its own result. Logs and tables go to $OUT (default: runs/gpu_check).
#
#   tests     the CUDA tests (tests/test_cuda_graphs.py: whole-iteration CUDA graphs train as eager code;
#             tests/test_fused_instance_norm.py: the Triton instance-norm kernels against PyTorch's)
#   speed     training loops, paper preset, batch 32 (SPEED_LOOPS): the authors' loop and the fast + bf16 CUDA-graph
#             loops, without and with the fused instance norm, and with a channels-last critic
#   cudnn     the fused graph loops again with cuDNN deterministic (what a training run sets through monai's
#             set_determinism) and autotuned (cudnn.benchmark); the speed stage runs PyTorch's default flags
#   memory    peak memory of fast + bf16 as CUDA graphs, with and without the fused instance norm
#   profile   top operators of one eager fast + bf16 iteration pair (PROFILE_LOOP), and a Chrome trace
#   inference eval-mode generator throughput, batch 64
#   compiled  fast + bf16 with torch.compile of the generator (minutes of compilation)
#   quality   the cpu preset on Kermany with presets/gpu.json (+ cuda_graphs), seeds QUALITY_SEEDS (0 1), side by side
#
#   bash scripts/benchmark_gpu.sh                                  # STAGES="tests speed cudnn profile"
#   STAGES=quality QUALITY_MINUTES=3 bash scripts/benchmark_gpu.sh # data in ${DATA_ROOT:-../shared/data}
set -u
OUT=${OUT:-runs/gpu_check}
DATA_ROOT=${DATA_ROOT:-../shared/data}
QUALITY_MINUTES=${QUALITY_MINUTES:-2}
STAGES=${STAGES:-tests speed cudnn profile}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log="$OUT/speed.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee -a "$log"
"$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.backends.cudnn.version())" | tee -a "$log"

has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage SECONDS ARGS...: one benchmark_speed.py run
    local limit=$1
    shift
    echo "### benchmark_speed.py $*" | tee -a "$log"
    timeout "$limit" "$PY" scripts/benchmark_speed.py --device cuda "$@" 2>&1 | tee -a "$log" | tail -14
    echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}
if has tests; then
    timeout 240 "$PY" -m pytest -q -s -p no:cacheprovider tests/test_fused_instance_norm.py tests/test_cuda_graphs.py 2>&1 |
        tee -a "$log" | tail -15
fi
if has speed; then
    stage 200 --preset paper --batch 32 --repeats 3 --iters 10 \
        --loops ${SPEED_LOOPS:-authors fast_bf16_graphs fast_bf16_fusednorm_graphs fast_bf16_fusednorm_clcritic_graphs} \
        --json "$OUT/speed_train.json"
fi
if has cudnn; then
    for mode in deterministic benchmark; do
        stage 120 --preset paper --batch 32 --repeats 3 --iters 10 --cudnn $mode \
            --loops fast_bf16_fusednorm_graphs fast_bf16_fusednorm_clcritic_graphs --json "$OUT/speed_cudnn_$mode.json"
    done
fi
if has memory; then
    stage 90 --preset paper --batch 32 --memory --loops fast_bf16_graphs fast_bf16_fusednorm_graphs --json "$OUT/speed_memory.json"
fi
if has profile; then
    stage 60 --preset paper --batch 32 --profile "${PROFILE_LOOP:-fast_bf16_fusednorm_clcritic}" --rows 25 \
        --trace "$OUT/trace_${PROFILE_LOOP:-fast_bf16_fusednorm_clcritic}.json"
fi
if has inference; then
    stage 40 --preset paper --inference --inference-bf16 --repeats 5 --json "$OUT/speed_inference.json"
fi
if has compiled; then
    stage 300 --preset paper --batch 32 --repeats 2 --iters 10 --loops fast_bf16 fast_bf16_compiled \
        --json "$OUT/speed_compiled.json"
fi

if has quality; then  # runs side by side on the one GPU; each stops after QUALITY_MINUTES of training, then evaluates
    mkdir -p runs/gpu_quality
    quality() {  # quality NAME ARGS...
        local name=$1
        shift
        mkdir -p "runs/gpu_quality/$name"
        timeout $((${QUALITY_MINUTES%.*} * 60 + 150)) "$PY" scripts/benchmark_quality.py --data_root "$DATA_ROOT" \
            --datasets kermany_pneumonia --out_root runs/gpu_quality --csv "runs/gpu_quality/$name/results.csv" \
            --max_minutes "$QUALITY_MINUTES" "$@" >"$OUT/quality_$name.log" 2>&1
        echo "### quality $name: exit $?" | tee -a "$log"
    }
    for v in ${QUALITY_VARIANTS:-sagan_gpu_graphs_fused sagan_gpu_graphs}; do
        for s in ${QUALITY_SEEDS:-0 1}; do
            quality "${v}_s$s" --variants "$v" --preset cpu --seeds "$s" --num_workers 2 &
        done
    done
    wait
    tar -czf "$OUT/quality.tar.gz" --exclude='*.pt' --exclude='tb' runs/gpu_quality "$OUT"/quality_*.log
    cat runs/gpu_quality/*/results.csv | tee -a "$log"
fi
