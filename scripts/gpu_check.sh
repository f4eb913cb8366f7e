#!/usr/bin/env bash
# Every GPU check of this repository in one call of at most GPU_CHECK_SECONDS (480) seconds, for a lent GPU machine
# with no network; docs/benchmarks.md says how to run it there.
#   bash scripts/gpu_check.sh [OUT]             # on the GPU; OUT defaults to $OUT, else gpu_check_out
#   bash scripts/gpu_check.sh --dry-run OUT     # the same steps on the CPU, tiny sizes, in a few minutes
#   bash scripts/gpu_check.sh --prepare         # fill gpu_carry/ (ignored by git) with what must travel
# Steps, by value: smoke (abort on failure), tests, bench_train_gpt2, bench_train_modern, bench_decode, ddp, fp16,
# resume, then shakespeare_char and shakespeare_char_modern to val 1.47 in the time left. Each step's limit is its
# own cap or the time left, whichever is less. OUT gets at most 6 files: summary.txt (one line per step, "NAME: exit
# CODE after SECONDS s" or "NAME: skipped, ..."), figures.jsonl (every measurement, appended as it is made),
# logs.tar.gz (every step's log, rewritten after each step), NAME.metrics.jsonl of the two Shakespeare runs and
# report.txt (scripts/gpu_report.py). Training outputs stay in a scratch folder outside OUT. A failed step's last 40
# lines go to standard output. GPU_CHECK_ONLY="tests bench_decode" runs only those steps (a second try).
# Needs python3 ($PYTHON) with torch, numpy, tqdm, tiktoken, safetensors, pytest (+ transformers, matplotlib).
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
carry=gpu_carry  # prepared Shakespeare (characters), tiktoken's files, pytest-timeout's wheel

# The arguments and settings first, each wrong one in one line, before a second is spent.
usage="usage: bash scripts/gpu_check.sh [OUT] | --dry-run OUT | --prepare"
steps=" smoke tests bench_train_gpt2 bench_train_modern bench_decode ddp fp16 resume shakespeare_char shakespeare_char_modern "
i=0
for arg in "$@"; do  # --dry-run and --prepare come first; nothing else starts with -
    i=$((i + 1))
    if [[ $arg == -* ]] && ! [[ $i -eq 1 && ($arg == --dry-run || $arg == --prepare) ]]; then
        echo "gpu_check.sh: unknown option $arg; $usage" >&2
        exit 2
    fi
done
case "${1:-}" in
    --prepare) [ $# -eq 1 ] || { echo "gpu_check.sh: --prepare takes nothing more; $usage" >&2; exit 2; } ;;
    --dry-run) [ $# -eq 2 ] || { echo "gpu_check.sh: --dry-run takes one OUT folder; $usage" >&2; exit 2; } ;;
    *) [ $# -le 1 ] || { echo "gpu_check.sh: one OUT folder at most, got $#; $usage" >&2; exit 2; } ;;
esac
[[ ${GPU_CHECK_SECONDS:-480} =~ ^[0-9]+$ ]] ||
    { echo "gpu_check.sh: GPU_CHECK_SECONDS must be whole seconds, got '$GPU_CHECK_SECONDS'" >&2; exit 2; }
for name in ${GPU_CHECK_ONLY:-}; do
    [[ $steps == *" $name "* ]] ||
        { echo "gpu_check.sh: GPU_CHECK_ONLY names no step '$name'; the steps:${steps% }" >&2; exit 2; }
done

if [ "${1:-}" = "--prepare" ]; then  # from a local corpus folder and tiktoken cache, as conftest.py finds them
    corpora=${SMALLGPT_DATA_DIR:-../shared/data}
    cache=${TIKTOKEN_CACHE_DIR:-../shared/tiktoken_cache}
    [ -f "$corpora/tinyshakespeare.txt" ] ||
        { echo "no $corpora/tinyshakespeare.txt: set SMALLGPT_DATA_DIR" >&2; exit 1; }
    [ -d "$cache" ] || { echo "no tiktoken cache at $cache: set TIKTOKEN_CACHE_DIR" >&2; exit 1; }
    mkdir -p "$carry/tiktoken_cache"
    $py data/shakespeare_char/prepare.py --input="$corpora/tinyshakespeare.txt" \
        --out_dir="$carry/shakespeare_char" || exit
    cp -f "$cache"/* "$carry/tiktoken_cache/"
    ls "$carry"/pytest_timeout-*.whl > /dev/null 2>&1 ||
        $py -m pip download -q --no-deps --only-binary=:all: -d "$carry" "pytest-timeout==2.4.0" ||
        echo "no pytest-timeout wheel (no network?): the tests step bounds each test by faulthandler only" >&2
    du -sh "$carry"
    exit 0
fi

dry=
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
out=${1:-${OUT:-gpu_check_out}}
probe=
{ mkdir -p "$out" && probe=$(mktemp "$out/.gpu_check.XXXXXX") && rm -f "$probe"; } 2> /dev/null ||
    { echo "gpu_check.sh: OUT $out cannot be written into (read-only, a file, or no permission): pass a folder" \
           "you may write to" >&2; exit 1; }
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # logs, checkpoints: never under OUT (8 files come back)
trap 'rm -rf "$work"' EXIT
mkdir "$work/logs"
summary=$out/summary.txt
figures=$out/figures.jsonl
: > "$summary"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
reserve=15  # seconds kept for the report and the last tarball
only=${GPU_CHECK_ONLY:-}
failed=0

# No step may reach the network (the GPU machine has none: a download would hang until its step's limit):
# requests and httpx fail at once through a closed port, and the hub libraries stay offline.
export HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY=localhost,127.0.0.1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export SMALLGPT_DEBUG=1 PYTHONUNBUFFERED=1  # whole tracebacks from torch and Triton, and logs as they happen
[ -d "$carry/tiktoken_cache" ] && export TIKTOKEN_CACHE_DIR=$PWD/$carry/tiktoken_cache
for wheel in "$carry"/pytest_timeout-*.whl; do  # a pure-Python wheel imports from its zip
    [ -f "$wheel" ] && export PYTHONPATH=$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}
done

step() {  # step NAME CAP COMMAND...: run it under min(CAP, time left), log it, add its summary line
    local name=$1 cap=$2 left limit t0 rc
    shift 2
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then return 0; fi
    left=$((deadline - SECONDS - reserve))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then  # (timeout 0 would mean no limit at all)
        echo "$name: skipped, $limit s left for it" | tee -a "$summary"
        return 0
    fi
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$work/logs/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$summary"
    if [ "$rc" -ne 0 ]; then
        failed=1
        echo "--- $name: the last 40 lines of its log"
        tail -n 40 "$work/logs/$name.log"
        echo "---"
    fi
    tar -czf "$out/logs.tar.gz" -C "$work" logs  # now: a check stopped later still brings these back
    return "$rc"
}

skip() {  # skip NAME REASON
    if [ -z "$only" ] || [[ " $only " == *" $1 "* ]]; then echo "$1: skipped, $2" | tee -a "$summary"; fi
}

# train_to_target METRICS ARGS...: train.py ARGS until an evaluation reaches val $target, then SIGTERM (it saves)
train_to_target() {
    local metrics=$1 pid
    shift
    $py train.py "$@" &
    pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        if [ -f "$metrics" ] && awk -v t="$target" -F'"val_loss": ' \
            'NF > 1 { split($2, v, /[,}]/); if (v[1] != "null" && v[1] + 0 <= t) hit = 1 } END { exit !hit }' "$metrics"
        then
            echo "val $target reached: stopping the run"
            kill -TERM "$pid"
            wait "$pid"
            return 0
        fi
        sleep 1
    done
    wait "$pid"
}
export -f train_to_target
export py target=1.47

# The data: the carried folder, else prepared here from a local corpus (SMALLGPT_DATA_DIR or ../shared/data).
data=$PWD/$carry/shakespeare_char
if [ ! -f "$data/train.bin" ]; then
    data=$work/shakespeare_char
    corpus=${SMALLGPT_DATA_DIR:-../shared/data}/tinyshakespeare.txt
    [ -f "$corpus" ] &&
        $py data/shakespeare_char/prepare.py --input="$corpus" --out_dir="$data" > "$work/logs/prepare.log" 2>&1
fi
[ -f "$data/train.bin" ] || data=

# Each command takes the GPU's settings; a dry run appends the CPU's (the last of a key wins), so that it parses the
# GPU's too.
bench=(--device=cuda --dtype=bfloat16 --batch_size=16 --train_steps=10 --repeats=3 --warmup=3)
short=(--device=cuda --eval_interval=100 --eval_iters=20 --log_interval=20 --compile=false) iters=200  # ~15 s each
runs=(--device=cuda --eval_interval=250 --eval_iters=50 --log_interval=50)
cpu=() cpu_bench=() cpu_modern=() cpu_short=() cpu_half=() cpu_runs=()
# Caps bound a hang, not the usual time: a bare machine's first torch.compile (Inductor and Triton cold, nothing
# cached) can take tens of seconds, and a smoke step killed by its cap ends the whole check.
cap_smoke=90 cap_tests=120 cap_bench=120
if [ -n "$dry" ]; then
    tiny=(--device=cpu --threads=1 --n_layer=2 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 --eval_iters=2
          --log_interval=5)
    cpu=(--device=cpu)
    cpu_bench=(--device=cpu --threads=1 --dtype=float32 --model=tiny --block_size=32 --batch_size=2 --train_steps=2
               --repeats=1 --warmup=1 --compile=false --decode_tokens=4 --prompt_len=4)  # compile: minutes of C++
    cpu_modern=("${cpu_bench[@]}" --model=configs/shakespeare_char_cpu_modern.toml --vocab_size=none)
    cpu_short=("${tiny[@]}" --eval_interval=5) iters=10
    cpu_half=(--dtype=bfloat16)  # a CPU trains in bfloat16, not float16
    cpu_runs=("${tiny[@]}" --max_iters=20 --eval_interval=10)
    cap_smoke=150 cap_tests=120 cap_bench=60
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null
fi

# 1. smoke: CUDA, bf16, flash forward and backward, torch.compile in both modes; nothing else is worth running without
if ! step smoke "$cap_smoke" $py scripts/gpu_smoke.py --device=cuda "${cpu[@]}" --out="$figures"; then
    echo "smoke failed: stopping"
    exit 1
fi

# 2. the CUDA-only tests, by name (with "cuda", "flash", "compiled" or "autocast" in it), each bounded by pytest-timeout
if $py -c "import importlib.metadata as m; m.distribution('pytest-timeout')" 2> /dev/null; then
    bound=(--timeout=90)
elif $py -c "import pytest_timeout" 2> /dev/null; then
    bound=(-p pytest_timeout --timeout=90)
else
    bound=(-o faulthandler_timeout=90)  # no pytest-timeout: a hung test's stack is printed, the step's limit ends it
fi
step tests "$cap_tests" $py -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors "${bound[@]}" \
    tests -k "cuda or flash or compiled or autocast"

# 3. training throughput of GPT-2 124M, the GPT-2 and the modern recipe: tokens/s and MFU after the compiling
#    warm-up steps, peak memory
step bench_train_gpt2 "$cap_bench" $py bench.py --model=gpt2 --what=train --compile=true "${bench[@]}" \
    "${cpu_bench[@]}" --out="$figures"
step bench_train_modern "$cap_bench" $py bench.py --model=configs/gpt2_124m_modern.toml --vocab_size=50304 \
    --what=train --compile=true "${bench[@]}" "${cpu_modern[@]}" --out="$figures"

# 4. decoding, batch 1 and 8, eager and compiled (CUDA graphs: each row says whether one ran)
step bench_decode 110 $py bench.py --model=gpt2 --what=decode --compile=both --decode_batch=1,8 --decode_tokens=128 \
    "${bench[@]}" "${cpu_bench[@]}" --out="$figures"

# 5. short runs of the paths nothing else here takes: torchrun (DDP), float16 with its GradScaler, a resume (of the
#    float16 run: its scaler's state too)
if [ -n "$data" ]; then
    base=(configs/shakespeare_char.toml --dataset="$data" "${short[@]}" "${cpu_short[@]}")
    step ddp 40 $py -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${base[@]}" \
        --max_iters="$iters" --out_dir="$work/ddp"
    step fp16 40 $py train.py "${base[@]}" --dtype=float16 "${cpu_half[@]}" --max_iters="$iters" --out_dir="$work/fp16"
    step resume 40 $py train.py "${base[@]}" --dtype=float16 "${cpu_half[@]}" --init_from=resume \
        --max_iters=$((2 * iters)) --out_dir="$work/fp16"
else
    for name in ddp fp16 resume; do skip "$name" "no Shakespeare data (bash scripts/gpu_check.sh --prepare)"; done
fi

# 6. time to val 1.47 on Tiny Shakespeare (characters), the baby GPT against the modern recipe, in the time left
for name in shakespeare_char shakespeare_char_modern; do
    if [ -z "$data" ]; then
        skip "$name" "no Shakespeare data (bash scripts/gpu_check.sh --prepare)"
        continue
    fi
    share=$((deadline - SECONDS - reserve))
    [ "$name" = shakespeare_char ] && share=$((share / 2))  # half the time left for the first, the rest for the second
    step "$name" "$share" bash -c 'train_to_target "$@"' _ "$work/$name/metrics.jsonl" "configs/$name.toml" \
        --dataset="$data" "${runs[@]}" "${cpu_runs[@]}" --out_dir="$work/$name"
    [ -f "$work/$name/metrics.jsonl" ] && cp "$work/$name/metrics.jsonl" "$out/$name.metrics.jsonl"
done

$py scripts/gpu_report.py "$out" > "$out/report.txt" 2>&1
cat "$out/report.txt"
tar -czf "$out/logs.tar.gz" -C "$work" logs
exit "$failed"
