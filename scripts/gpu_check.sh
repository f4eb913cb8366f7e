#!/usr/bin/env bash
# Every GPU check of this repository in one run (< 8 minutes on an H100), for a lent GPU machine with no network:
#   bash scripts/gpu_check.sh [OUT_DIR]         # figures and logs go to OUT_DIR (default: $OUT, else gpu_check_out)
# Needs only python3 with torch (CUDA), numpy, tqdm, tiktoken, safetensors, pytest (+ transformers, matplotlib).
# The Shakespeare runs need data/shakespeare_char prepared (copy it along, or set SMALLGPT_DATA_DIR to a folder
# holding tinyshakespeare.txt); without it they are skipped. Summary: OUT_DIR/summary.txt; each step's log beside it.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
export SMALLGPT_SLOW_TESTS=1 PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, note the outcome in the summary
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$summary"
}

$py -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$summary"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$summary" 2>/dev/null

# 1. the CUDA-only tests (flash kernel really chosen, compiled static-cache decode) with the rest of their files
step tests 150 $py -m pytest -q -rs tests/test_model.py tests/test_sample.py tests/test_bench.py tests/test_switches.py

# 2. training throughput of GPT-2 124M: the GPT-2 recipe and the modern one (MFU, tokens/s, peak memory)
step bench_train_gpt2 90 $py bench.py --model=gpt2 --what=train --device=cuda --dtype=bfloat16 --compile=true \
    --batch_size=16 --train_steps=10 --repeats=3 --out="$out/bench.jsonl"
step bench_train_modern 90 $py bench.py --model=configs/gpt2_124m_modern.toml --vocab_size=50304 --what=train \
    --device=cuda --dtype=bfloat16 --compile=true --batch_size=16 --train_steps=10 --repeats=3 --out="$out/bench.jsonl"

# 3. decoding, batch 1 and 8, eager and compiled (CUDA graphs)
step bench_decode 90 $py bench.py --model=gpt2 --what=decode --device=cuda --dtype=bfloat16 --compile=both \
    --decode_batch=1,8 --decode_tokens=128 --repeats=3 --out="$out/bench.jsonl"

# 4. time to val 1.47 on Tiny Shakespeare (characters): the baby GPT against the modern recipe, 90 s each at most
if [ ! -f data/shakespeare_char/train.bin ] && [ -f "${SMALLGPT_DATA_DIR:-../shared/data}/tinyshakespeare.txt" ]; then
    $py data/shakespeare_char/prepare.py --input="${SMALLGPT_DATA_DIR:-../shared/data}/tinyshakespeare.txt" \
        > "$out/prepare.log" 2>&1
fi
if [ -f data/shakespeare_char/train.bin ]; then
    for name in shakespeare_char shakespeare_char_modern; do
        step "$name" 100 $py train.py "configs/$name.toml" --out_dir="$out/$name" --eval_interval=100 \
            --eval_iters=50 --log_interval=50
    done
else
    echo "shakespeare runs: skipped (no data/shakespeare_char; see the header)" | tee -a "$summary"
fi

$py scripts/gpu_report.py "$out" | tee -a "$summary"
