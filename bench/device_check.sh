#!/usr/bin/env bash
# Every GPU check and measurement of the image work, as one command for a lent GPU machine
# (the device tool allows 10 minutes per command and 15 minutes of device time per session):
# the CUDA tests, then bench_fm_speed (bf16 autocast and torch.compile), bench_memory and
# bench_images on Fashion-MNIST, each under its own time limit, each table written to $OUT as
# it is printed, so that a run cut short still returns what it measured. The benchmarks' results
# files go to $OUT/results (CNF_BENCH_RESULTS): copy them into bench/results/ here, then run
# `python bench/tables.py`.
#
# The limits add up to 580 s with MINUTES=1 (the tool's command limit is 600 s).
#
# Not yet run on a GPU: no session that built it was lent one. Expect to fix small things on
# the first run; size --minutes to what is left.
#
# Here, before the call (the device machine reaches no network, so the data travels along):
#     sudo apt-get install dataset-fashion-mnist
#     mkdir -p data && cp -r /usr/share/datasets/fashion-mnist data/   # 31 MB, git-ignored
# Then the device tool's run, with carry ["data"] and this command:
#     bash bench/device_check.sh data/fashion-mnist 1
# (arguments: the IDX files' directory, minutes of training per model in bench_images)
set -uo pipefail
DATA=${1:?usage: bash bench/device_check.sh FASHION_MNIST_DIR [MINUTES]}
MINUTES=${2:-1}
OUT=${OUT:-device-results}
mkdir -p "$OUT"
export CNF_BENCH_RESULTS="$OUT/results"  # each benchmark's results file (bench/harness.py)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the machine's torch and torchdiffeq, no install
# bench_memory reads Fashion-MNIST from Debian's path
DEBIAN=/usr/share/datasets/fashion-mnist
if [ ! -e "$DEBIAN/train-images-idx3-ubyte.gz" ]; then
    mkdir -p "$DEBIAN" && cp "$DATA"/*-ubyte* "$DEBIAN"/
fi

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output into $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -i "warning" | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchdiffeq; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$OUT/gpu.txt"
step tests 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_images_fm.py \
    tests/test_images_cli.py tests/test_multiscale.py
step fm_speed 100 python3 bench/bench_fm_speed.py --gpu --size 28 --batch 256 --steps 20
step memory 80 python3 bench/bench_memory.py --gpu --data fashion-mnist --batches 64 128 256 512
step images $((MINUTES * 4 * 60 + 100)) python3 bench/bench_images.py --gpu --minutes "$MINUTES" \
    --data-dir "$DATA" --eval-n 300 --only cnf ffjord fm-unet fm-unet-bf16 --grids "$OUT"
