#!/usr/bin/env bash
# The GPU checks of a change, in one command on a CUDA machine (what CI, CPU-only, cannot run):
#   bash benchmarks/gpu_checks.sh tests|dependent_off|dependent_on|switches|speed|headline|compile|official|official_v1 [OUT_DIR]
#   tests:    the kernel and model tests with the compiled kernels (TRITON_INTERPRET unset)
#   dependent_off, dependent_on: whether dependent launches can be the default (each ~7 minutes): the launch
#             tests (dependent against ordinary launches, bit for bit) and the kernel tests with them off; then
#             the kernel tests with them on (FLASHBIAS_TEST_DEPENDENT_LAUNCH=1, see tests/conftest.py)
#   switches: the speed switches that are off until measured (dependent launches, the graph input read in place,
#             the weight refresh beside the first stage): the replay-equals-eager and weight-copy tests with them,
#             their whole-model A/B (bench_switches.py), and the probes of what is left (bench_probes.py: the bias
#             gather, the weight refresh beside attention, cuBLAS memsets)
#   speed:    batch sweep (small batches), Swin V1, timm/transformers adapters
#   headline: SwinV2-B/384 batch 64 fp16 against the official file and the compiled SDPA peer in one run, and
#             dependent launches on against off
#   compile:  torch.compile of the drop-in (default and reduce-overhead) against eager and CUDA graphs
#   official: the official main.py --eval / --throughput / training / --resume, official file vs drop-in,
#             on timm 1.x through scripts/install.sh --fix-official (needs third_party/Swin-Transformer and
#             the shared tool official_main_eval.py next to this repository, or at $OFFICIAL_MAIN_EVAL)
#   official_v1: the same --eval comparison on the Swin V1-B/384 config
# Python packages missing on the machine (yacs, termcolor) may be given as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-tests}"
out="${2:-${OUT:-/tmp/flashbias-gpu}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/flashbias-site .whl/*.whl
    export PYTHONPATH=/tmp/flashbias-site${PYTHONPATH:+:$PYTHONPATH}
fi
case "$what" in
tests)
    timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_model_gpu.py tests/test_swin_v1_gpu.py \
        tests/test_cuda_graphs.py tests/test_adapters.py tests/test_export.py tests/test_kernel.py 2>&1 \
        | tee "$out/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25 ;;
dependent_off|dependent_on)
    setting=0
    if [ "$what" = dependent_on ]; then
        setting=1
    else
        timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_launch.py 2>&1 | tee "$out/launch_tests.log" \
            | grep -E "passed|failed|FAILED|^E " | tail -8
    fi
    FLASHBIAS_TEST_DEPENDENT_LAUNCH=$setting timeout 480 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/test_kernel.py 2>&1 | tee "$out/kernel_tests_$what.log" | grep -E "passed|failed|FAILED|^E " | tail -12 ;;
switches)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_model_gpu.py -k "replay_equals_eager or follows or weight_copies" \
        2>&1 | tee "$out/switch_tests.log" | grep -E "passed|failed|FAILED|^E " | tail -8
    timeout 220 python3 benchmarks/bench_switches.py --out "$out/switches.md" 2>&1 | grep -E "^\||rror" | tail -6
    timeout 200 python3 benchmarks/bench_probes.py --out "$out/probes.md" 2>&1 | grep -E "^\||rror" | tail -40 ;;
speed)
    timeout 170 python3 benchmarks/bench_batch_sweep.py --iters 15 --out "$out/batch_sweep.md" 2>&1 | grep "model="
    timeout 220 python3 benchmarks/bench_swin_v1.py --out-dir "$out" 2>&1 | grep -v -i warn | tail -14
    timeout 200 python3 benchmarks/bench_adapters.py --no-qkv --out-dir "$out" 2>&1 | grep -v -i warn | tail -10 ;;
headline)
    timeout 330 python3 benchmarks/bench_model.py --models b384 --dtypes fp16 --iters 15 --no-timm --rules '' --peers \
        --out-dir "$out" 2>&1 | grep -E "official|FlashBias|SDPA|rror" | cut -c1-200
    grep -A3 "strongest peer" "$out"/model_*.md
    timeout 200 python3 benchmarks/bench_switches.py --switches dependent_launch --out "$out/dependent_launch.md" \
        2>&1 | tail -4 ;;
compile)
    timeout 560 python3 benchmarks/bench_batch_sweep.py --models b384 --batches 1,8,64 --compile b384 --iters 10 \
        --out "$out/compile_sweep.md" 2>&1 | grep "model=" ;;
official)
    tool="${OFFICIAL_MAIN_EVAL:-../shared/tools/official_main_eval.py}"
    raw=/tmp/swin-raw; fixed=/tmp/swin-fixed; ours=/tmp/swin-ours
    rm -rf $raw $fixed $ours && cp -a third_party/Swin-Transformer $raw && cp -a $raw $fixed && cp -a $raw $ours
    PYTHON=python3 scripts/install.sh --fix-official $fixed > /dev/null
    PYTHON=python3 scripts/install.sh --fix-official $ours > /dev/null && scripts/install.sh $ours > /dev/null
    for mode in eval throughput; do
        for checkout in $fixed $ours; do
            echo "== $mode $(basename $checkout)"
            timeout 150 python3 "$tool" --swin $checkout --keep /tmp/w-$mode --mode $mode 2>&1 | tail -1
        done
    done
    echo "== raw official checkout on this timm (expect the t_mul TypeError)"
    timeout 60 python3 "$tool" --swin $raw --keep /tmp/w-raw --mode eval --nval 64 2>&1 | grep -m1 -o "TypeError.*t_mul.*"
    echo "== a short training run with the drop-in (saves a trainer checkpoint holding the yacs config)"
    timeout 150 python3 "$tool" --swin $ours --keep /tmp/w-train --mode train --batch 16 --ntrain 64 2>&1 | tail -2
    ckpt=$(find /tmp/w-train -name ckpt_epoch_0.pth | head -1)
    cfg=configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml
    python3 -c "import torch; torch.load('$ckpt')" 2>&1 | grep -m1 -o "Unsupported global.*CfgNode" || true
    cd /tmp/w-train/Swin-Transformer
    echo "== --eval --resume of that checkpoint"
    timeout 90 python3 -m torch.distributed.launch --nproc_per_node 1 --master_port 12350 main.py --eval --cfg $cfg \
        --data-path /tmp/w-train/data-0 --resume "$ckpt" --batch-size 16 --output /tmp/w-train/resume-eval \
        --opts TRAIN.AUTO_RESUME False 2>&1 | grep -E "Acc@1|Error" | tail -2
    echo "== training resumed from it"
    timeout 120 python3 -m torch.distributed.launch --nproc_per_node 1 --master_port 12351 main.py --cfg $cfg \
        --data-path /tmp/w-train/data-0 --resume "$ckpt" --batch-size 16 --output /tmp/w-train/resume-train \
        --opts TRAIN.EPOCHS 2 TRAIN.WARMUP_EPOCHS 0 TRAIN.AUTO_RESUME False PRINT_FREQ 1 2>&1 \
        | grep -E "loaded successfully|Train: \[1/2\]|Max accuracy|Error" | tail -4 ;;
official_v1)
    tool="${OFFICIAL_MAIN_EVAL:-../shared/tools/official_main_eval.py}"
    fixed=/tmp/swin-fixed; ours=/tmp/swin-ours
    rm -rf $fixed $ours && cp -a third_party/Swin-Transformer $fixed && cp -a $fixed $ours
    PYTHON=python3 scripts/install.sh --fix-official $fixed > /dev/null
    PYTHON=python3 scripts/install.sh --fix-official $ours > /dev/null && scripts/install.sh $ours > /dev/null
    for checkout in $fixed $ours; do
        echo "== Swin V1-B/384 eval $(basename $checkout)"
        timeout 200 python3 "$tool" --swin $checkout --keep /tmp/w-v1 --mode eval \
            --cfg configs/swin/swin_base_patch4_window12_384_finetune.yaml 2>&1 | tail -1
    done ;;
esac
