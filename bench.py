"""Measure training and decoding speed on this machine: tokens/s, MFU, peak memory.

    python bench.py                     # training and decoding: GPT-2 124M on a GPU, the quick start's model on a CPU
    python bench.py --model=configs/shakespeare_char_cpu.toml --what=train
    python bench.py --device=cuda --dtype=bfloat16 --compile=both --peak_flops=989e12
    python bench.py --what=decode --baselines=true           # also nanoGPT's loop and transformers' generate
    python bench.py --what=train --profile=true              # where a training step spends its time
    python bench.py --what=serve --serve_clients=1,4,16      # serve.py: concurrent streaming clients (pip .[serve])
    python bench.py --what=long --long_window=16             # generation at 1x, 4x, 16x block_size: rolling vs crop
    python bench.py --model=gpt2 --what=decode --decode_batch=1,16 --quantize=both   # int8 weights beside float
    python bench.py --model=gpt2 --what=decode --quantize=both --compile=both   # each eager and compiled, side by side

Every figure is the median of --repeats timed runs after --warmup untimed steps (which also absorb compilation).
A decode run is one call that prefills the prompt and then makes --decode_tokens one-token steps: its tokens/s and
ms_per_token include the prefill.
Each measurement is announced as it starts (with a bar when it runs long), appended to --out as one JSON line as
soon as it is done, with the device, torch version and date, so that docs/benchmarks.md can quote it, and printed in
a table at the end. Compiled decode rows say whether the step really ran as a CUDA graph (cuda_graphs).
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import copy
import datetime
import json
import math
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from config import (autocast_context, check_compiler, device_peak_flops, enable_tf32, format_config, load_toml,
                    parse_config, resolve_device, resolve_dtype, set_threads, synchronize)
from hf import hf_state_dict
from model import GPT, MODEL_FIELDS, GPTConfig
from quantize import Int8Linear, check_quantize, is_linear, quantize_model
from sample import compiled_generate, cuda_graphs_recorded
from sampling import sample_next
from tokens import load_meta, padded_vocab_size, resolve_dataset

BASELINES_NEED_BIAS = "--baselines needs a model with biases (Hugging Face's GPT-2 has them)"


@dataclass
class BenchConfig:
    model: str = "auto"  # tiny, gpt2[-medium|-large|-xl] or a training config .toml; auto: gpt2 on CUDA, else the quick start's config
    what: str = "train,decode"  # comma-separated: train, decode, serve, long (generation far past block_size)
    device: str = "auto"  # cpu, cuda, cuda:1, mps; auto picks cuda when present
    dtype: str = "auto"  # float32, bfloat16 or float16; auto: bfloat16 on CUDA, float32 elsewhere
    compile: str = "false"  # torch.compile: false, true, or both (each measured separately; with --quantize, alternately)
    batch_size: int | None = None  # training micro-batch; none: the config file's, else 8
    block_size: int | None = None  # training sequence length; none: the model's block_size
    vocab_size: int | None = None  # none: the config's dataset vocabulary, padded as train.py pads it; else 50304
    train_steps: int = 10  # timed training steps per repeat
    warmup: int = 3  # untimed steps (or decodes) before timing
    repeats: int = 3  # timed repeats; the median is reported
    decode_batch: str = "1,8"  # comma-separated batch sizes for decoding
    prompt_len: int = 16  # prompt tokens before decoding
    decode_tokens: int = 64  # new tokens per timed decode (serve: per client)
    serve_clients: str = "1,4,16"  # serve: comma-separated numbers of streaming clients at once
    serve_pause: int = 0  # serve: also time how long a prompt of this many tokens pauses 4 streams; 0: no such round
    baselines: bool = False  # decode: also time nanoGPT's recompute loop and transformers' GPT2 generate
    peak_flops: float | None = None  # the device's peak FLOP/s for MFU; none: model.py's table (H100 989e12, ...)
    profile: bool = False  # train: print a torch.profiler table of a few steps instead of timing
    out: str = "out/bench_results.jsonl"  # results are appended here, one JSON object per measurement
    seed: int = 1337  # weights and tokens are random, from this seed
    optimizer: str = "auto"  # train: adamw or muon; auto: the training config's, else adamw
    threads: int | None = None  # torch CPU threads; none: $OMP_NUM_THREADS, else the idle cores (docs/training.md: Threads); 0: one per core
    long_window: int | None = None  # long: the RoPE window model's window; none: block_size / 4
    quantize: str = "none"  # decode, serve: none, int8 (quantize.py), or both (float and int8 in alternate rounds)

    def __post_init__(self) -> None:
        unknown = set(self.what.split(",")) - {"train", "decode", "serve", "long"}
        if unknown:
            raise ValueError(f"--what takes train, decode, serve and/or long, got {sorted(unknown)}")
        if self.compile not in ("false", "true", "both"):
            raise ValueError(f"--compile takes false, true or both, got {self.compile!r}")
        if self.optimizer not in ("auto", "adamw", "muon"):
            raise ValueError(f"--optimizer takes auto, adamw or muon, got {self.optimizer!r}")
        if self.quantize != "both":
            check_quantize(self.quantize)
        if min(self.train_steps, self.repeats, self.decode_tokens, self.prompt_len) < 1:
            raise ValueError("--train_steps, --repeats, --decode_tokens and --prompt_len must be at least 1")


CPU_MODEL = "configs/shakespeare_char_cpu.toml"  # the quick start's model: GPT-2 124M takes ~40 minutes on 2 cores
SIZES = {  # (n_layer, n_head, n_embd), GPT-2's family with its 1024-token context
    "tiny": (2, 4, 64),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


def model_config(cfg: BenchConfig) -> tuple[GPTConfig, int]:
    """The model to benchmark and its training micro-batch size."""
    if cfg.model in SIZES:
        n_layer, n_head, n_embd = SIZES[cfg.model]
        gpt = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, dropout=0.0,
                        vocab_size=cfg.vocab_size or GPTConfig.vocab_size)
        return gpt, cfg.batch_size or 8
    if not cfg.model.endswith(".toml"):
        raise SystemExit(f"--model={cfg.model}: give one of {', '.join(SIZES)} or a training config .toml")
    from train import TrainConfig  # read as train.py reads it: types and ranges checked, each mistake one line

    settings = parse_config(TrainConfig, [cfg.model])
    train = {key: getattr(settings, key) for key in load_toml(cfg.model)}  # the file's own settings
    vocab = cfg.vocab_size or _dataset_vocab(train.get("dataset")) or GPTConfig.vocab_size
    gpt = GPTConfig(vocab_size=vocab, **{k: train[k] for k in MODEL_FIELDS if k in train})  # every switch
    return gpt, cfg.batch_size or train.get("batch_size", 8)


def _dataset_vocab(dataset: str | None) -> int | None:
    """The model vocabulary train.py builds for a prepared dataset (a char model at its size, cl100k_base at 100,288);
    None when the dataset is not prepared here."""
    if not dataset:
        return None
    try:
        meta = load_meta(resolve_dataset(dataset))
    except (SystemExit, ValueError):  # no such folder, or not prepared: bench the default vocabulary instead
        return None
    return padded_vocab_size(meta["vocab_size"], char=meta["tokenizer"].get("kind") == "char")


def announce(what: str) -> None:
    print(f"measuring {what}", flush=True)


def progress(total: int, unit: str) -> tqdm:
    """A bar on standard error that appears only when a measurement runs longer than 2 s (and only on a terminal)."""
    return tqdm(total=total, unit=unit, delay=2, leave=False, disable=not sys.stderr.isatty())


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"  # also cuda:1


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by tensors since the last torch.cuda.reset_peak_memory_stats, in MiB.

    On the CPU: the peak resident set of the whole process since it started (ru_maxrss, KiB on Linux). It never goes
    down, so it describes the first measurement only; bench_decode reports None there instead.
    """
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_train(cfg: BenchConfig, gpt: GPTConfig, batch_size: int, device: str, dtype: torch.dtype,
                compiled: bool) -> dict:
    torch.manual_seed(cfg.seed)
    T = cfg.block_size or gpt.block_size
    model = GPT(gpt).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), torch.device(device).type, cfg.optimizer)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, gpt.vocab_size, (batch_size, T), device=device)
    y = torch.randint(0, gpt.vocab_size, (batch_size, T), device=device)

    def step() -> None:  # the training step of train.py: forward, backward, clip, update
        with autocast_context(device, dtype):
            _, loss = step_model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if cfg.profile:
        return profile_steps(step, device)
    announce(f"train: batch {batch_size} x {T}, compile={compiled}: {cfg.warmup} + {cfg.repeats} x {cfg.train_steps} steps")
    bar = progress(cfg.warmup + cfg.repeats * cfg.train_steps, "steps")
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
        bar.update(1)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        for _ in range(cfg.train_steps):
            step()
            bar.update(1)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    bar.close()
    dt = statistics.median(times)
    tokens_per_sec = batch_size * T * cfg.train_steps / dt
    peak = cfg.peak_flops or device_peak_flops(torch.device(device))
    return {
        "what": "train", "batch_size": batch_size, "seq_len": T,
        "tokens_per_sec": round(tokens_per_sec, 1), "ms_per_step": round(1000 * dt / cfg.train_steps, 2),
        "warmup_s": round(warmup_s, 2),  # the untimed steps, the compilation included
        "mfu": round(model.estimate_mfu(tokens_per_sec, peak, T), 4) if peak else None,
        # on the CPU the process's peak so far: this step's only when train is the first measurement (the default)
        "peak_memory_mb": round(peak_memory_mb(device), 1), "params": model.num_params(non_embedding=False),
    }


def profile_steps(step: Callable[[], None], device: str) -> dict:
    """Print where the time of a few training steps goes, by operator, self time first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if is_cuda(device) else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    return {"what": "profile"}


def bench_decode(cfg: BenchConfig, gpt: GPTConfig, batch: int, device: str, dtype: torch.dtype,
                 compiled: bool, method: str) -> dict:
    """Decode speed of one method: each timed run prefills the prompt and then takes decode_tokens greedy steps.

    tokens_per_sec and ms_per_token divide the whole run by decode_tokens, so they include the prefill. The peak
    memory is the GPU's during the timed runs; None on the CPU, where only the process's lifetime peak is known.
    """
    torch.manual_seed(cfg.seed)
    # Weights cast to dtype, as sample.py does: decoding reads every weight once a token, so autocast (which
    # keeps fp32 weights and casts them at every step) would only add work.
    model = GPT(gpt).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, gpt.vocab_size, (batch, cfg.prompt_len), device=device)
    n = cfg.decode_tokens
    if method == "kv-cache":
        run = _cached_decoder(model, prompt, n, compiled)
    elif method == "recompute (nanoGPT)":
        run = lambda: _recompute_decode(model, prompt, n)  # noqa: E731
    else:
        run = _transformers_decoder(model, prompt, n)
    announce(f"decode, {method}: batch {batch}, compile={compiled}: {cfg.warmup} + {cfg.repeats} runs of "
             f"{cfg.prompt_len} + {n} tokens")
    bar = progress(cfg.warmup + cfg.repeats, "runs")
    graphs = cuda_graphs_recorded(torch.device(device))
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(cfg.warmup):
            run()
            bar.update(1)
        synchronize(device)
        warmup_s = time.perf_counter() - t0
        after = cuda_graphs_recorded(torch.device(device))
        captured = None if None in (graphs, after) else after > graphs  # recorded during the warm-up; None: unknown
        if is_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)  # this decode's peak, not the training run's before it
        times = []
        for _ in range(cfg.repeats):
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    dt = statistics.median(times)
    return {"what": "decode", "method": method, "batch_size": batch, "prompt_len": cfg.prompt_len, "new_tokens": n,
            "tokens_per_sec": round(batch * n / dt, 1), "ms_per_token": round(1000 * dt / n, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1) if is_cuda(device) else None,
            "warmup_s": round(warmup_s, 2), "cuda_graphs": captured}


def bench_decode_quantized(cfg: BenchConfig, gpt: GPTConfig, batch: int, device: str, dtype: torch.dtype,
                           variants: list[tuple[str, bool]], copy_gb_per_s: float) -> list[dict]:
    """Decode speed (as bench_decode, through the KV cache) of the same random weights as each variant, a
    (quantize.py's --quantize, compiled) pair, timed in alternate rounds (the order flips every round) so that a
    machine whose load drifts weighs on each alike; a compiled variant is compiled in its first (warm-up) run,
    whose time is first_run_s. weights_gb_per_s: the bytes a step reads (weight_bytes) times steps per second;
    of_copy: that over the machine's copy bandwidth (read + write of a large tensor, copy_bandwidth)."""
    torch.manual_seed(cfg.seed)
    base = GPT(gpt).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, gpt.vocab_size, (batch, cfg.prompt_len), device=device)
    models, quantize_s = {}, {}
    for q in dict.fromkeys(q for q, _ in variants):
        models[q] = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_model(models[q], q, torch.device(device))
        quantize_s[q] = time.perf_counter() - t0
    n = cfg.decode_tokens
    names = [f"{q}{', compiled' if c else ''}" for q, c in variants]
    announce(f"decode, kv-cache, {' and '.join(names)} in alternate rounds: batch {batch}: "
             f"{cfg.warmup} + {cfg.repeats} runs of {cfg.prompt_len} + {n} tokens each")
    times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    first: dict[tuple[str, bool], float] = {}
    with torch.no_grad():
        for r in range(cfg.warmup + cfg.repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:
                synchronize(device)
                t0 = time.perf_counter()
                _cached_decoder(models[v[0]], prompt, n, v[1])()
                synchronize(device)
                first.setdefault(v, time.perf_counter() - t0)
                if r >= cfg.warmup:
                    times[v].append(time.perf_counter() - t0)
    rows = []
    for v in variants:
        (q, compiled), dt = v, statistics.median(times[v])
        gb_per_s = weight_bytes(models[q]) * n / dt / 1e9  # n steps (the prefill counted as one) in dt
        rows.append({"what": "decode", "method": "kv-cache", "compile": compiled, "quantize": q, "batch_size": batch,
                     "prompt_len": cfg.prompt_len, "new_tokens": n, "tokens_per_sec": round(batch * n / dt, 1),
                     "ms_per_token": round(1000 * dt / n, 2), "weights_mb": round(weight_bytes(models[q]) / 1e6, 2),
                     "weights_gb_per_s": float(f"{gb_per_s:.3g}"), "of_copy": float(f"{gb_per_s / copy_gb_per_s:.2g}"),
                     "quantize_s": round(quantize_s[q], 2), "first_run_s": round(first[v], 1)})
    return rows


def weight_bytes(model: GPT) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding tables, which it reads a row of per
    token (a tied wte is read whole as the float head's matrix, so it counts when the head is float)."""
    heads = {id(m.weight) for m in model.modules() if is_linear(m) or isinstance(m, Int8Linear)}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - heads
    read = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in tables}
    return sum(t.numel() * t.element_size() for t in read.values())


def copy_bandwidth(device: str, mb: int = 512) -> float:
    """GB/s that a copy of a large tensor moves (bytes read + written), best of 5: the memory's practical limit."""
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(6):  # the first touches the pages
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best / 1e9


def _cached_decoder(model: GPT, prompt: torch.Tensor, n: int, compiled: bool) -> Callable[[], torch.Tensor]:
    """Prefill plus one-token steps through the KV cache: model.generate's loop, greedy."""
    if not compiled:
        return lambda: model.generate(prompt, n, temperature=0)
    return lambda: compiled_generate(model, prompt, n, temperature=0)  # sample.py --compile's decoder


def _recompute_decode(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's generate: every new token recomputes the whole (cropped) context."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, sample_next(logits[:, -1, :], temperature=0)], dim=1)
    return idx


def _transformers_decoder(model: GPT, prompt: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    """transformers' GPT2LMHeadModel.generate on the same weights (greedy, its own KV cache)."""
    if not model.config.bias:  # GPT2LMHeadModel has no bias-free variant to load these weights into
        raise SystemExit(BASELINES_NEED_BIAS)
    try:
        import transformers
    except ImportError:
        raise SystemExit("--baselines=true needs transformers: pip install -e '.[test]'") from None
    c = model.config
    hf_config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head)
    hf = transformers.GPT2LMHeadModel(hf_config).to(device=prompt.device, dtype=model.lm_head.weight.dtype).eval()
    weights = {"transformer." + k: v for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(weights, strict=False)  # the head is tied to wte, so not in weights
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    mask = torch.ones_like(prompt)
    return lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    print(format_config(cfg))
    set_threads(cfg.threads)
    device = str(resolve_device(cfg.device))  # "cuda" for auto on a GPU; SystemExit for a device that is not here
    dtype = resolve_dtype(cfg.dtype, torch.device(device))
    dtype_name = str(dtype).removeprefix("torch.")
    enable_tf32()  # as train.py
    if cfg.model == "auto":
        cfg.model = "gpt2" if is_cuda(device) else str(Path(__file__).parent / CPU_MODEL)
        print(f"model: {cfg.model}")
    gpt, batch_size = model_config(cfg)
    if cfg.optimizer == "auto":
        cfg.optimizer = load_toml(cfg.model).get("optimizer", "adamw") if cfg.model.endswith(".toml") else "adamw"
    if cfg.baselines and "decode" in cfg.what and not gpt.bias:
        raise SystemExit(BASELINES_NEED_BIAS)  # now, not after the other measurements
    compile_modes = {"false": [False], "true": [True], "both": [False, True]}[cfg.compile]
    check_compiler(torch.device(device), True in compile_modes)
    stamp = {
        "model": cfg.model, "device": device, "device_name": _device_name(device), "dtype": dtype_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "optimizer": cfg.optimizer,
        "vocab_size": gpt.vocab_size,
        "date": datetime.date.today().isoformat(),
    }
    results = []

    def emit(row: dict) -> None:  # appended at once: a run stopped later keeps the rows measured so far
        if row.get("what") == "profile":
            return
        results.append({**stamp, **row})
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.out, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")

    for compiled in compile_modes:
        if "train" in cfg.what:
            emit({"compile": compiled, **bench_train(cfg, gpt, batch_size, device, dtype, compiled)})
        if "decode" in cfg.what and cfg.quantize == "none":
            for batch in (int(b) for b in cfg.decode_batch.split(",")):
                emit({"compile": compiled, **bench_decode(cfg, gpt, batch, device, dtype, compiled, "kv-cache")})
    if "decode" in cfg.what and cfg.quantize != "none":  # every weight format and compile mode in alternate rounds
        variants = [(q, c) for c in compile_modes for q in (["none", "int8"] if cfg.quantize == "both"
                                                            else [cfg.quantize])]
        copy_gb_per_s = copy_bandwidth(device)
        emit({"what": "copy", "gb_per_s": round(copy_gb_per_s, 1)})
        for batch in (int(b) for b in cfg.decode_batch.split(",")):
            for row in bench_decode_quantized(cfg, gpt, batch, device, dtype, variants, copy_gb_per_s):
                emit(row)
    if cfg.baselines and "decode" in cfg.what:
        for method in ("recompute (nanoGPT)", "transformers"):
            emit({"compile": False, **bench_decode(cfg, gpt, 1, device, dtype, False, method)})
    if "serve" in cfg.what:
        for quantize in ["none", "int8"] if cfg.quantize == "both" else [cfg.quantize]:
            for row in bench_serve(cfg, gpt, device, dtype, quantize):
                emit(row if cfg.quantize == "none" else {**row, "quantize": quantize})
    if "long" in cfg.what:
        for row in bench_long(cfg, gpt, device, dtype):
            emit(row)
    if results:
        print_table(results)
    return results


LONG = (1, 4, 16)  # --what=long: generation speed measured as the sequence reaches these multiples of block_size


def bench_long(cfg: BenchConfig, gpt: GPTConfig, device: str, dtype: torch.dtype) -> list[dict]:
    """Batch-1 greedy generation to 16x block_size, timed token by token: a RoPE window model (its cache rolls on),
    the full-attention model as configured (model.generate: the cache, then nanoGPT's crop), and nanoGPT's own loop
    (every token recomputes the cropped context). ms_per_token at Nx: the median of the block_size / 4 tokens before
    the sequence is N x block_size long; ratio: that over the median at 1x."""
    B = cfg.block_size or gpt.block_size
    if B < 8 or cfg.prompt_len > B // 2:
        raise SystemExit(f"--what=long: needs block_size >= 8 (got {B}) and --prompt_len={cfg.prompt_len} at most "
                         f"block_size / 2")
    window = cfg.long_window or max(1, B // 4)
    full = GPTConfig(**{**gpt.__dict__, "block_size": B, "window": None})  # full attention, even if --model has one
    models = {"window (rolling cache)": GPTConfig(**{**full.__dict__, "pos_embedding": "rope", "window": window}),
              "full (cache, then crop)": full, "full (nanoGPT loop)": full}
    results = []
    for method, config in models.items():
        torch.manual_seed(cfg.seed)
        model = GPT(config).to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, config.vocab_size, (1, cfg.prompt_len), device=device)
        n = LONG[-1] * B - cfg.prompt_len
        stream = _nanogpt_stream(model, prompt, n) if "nanoGPT" in method else \
            model.generate_stream(prompt, n, temperature=0)
        announce(f"long, {method}: {cfg.prompt_len} + {n} tokens, block_size {B}")
        stamps = [time.perf_counter()]
        with torch.no_grad():
            for _ in tqdm(stream, total=n, desc="tokens", leave=False, disable=not sys.stderr.isatty()):
                synchronize(device)
                stamps.append(time.perf_counter())
        per_token = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first stamp after the prefill
        at = {x: 1000 * statistics.median(per_token[x * B - B // 4 - cfg.prompt_len - 1:x * B - cfg.prompt_len - 1])
              for x in LONG}
        for x in LONG:
            results.append({"what": "long", "method": method, "window": window if "window" in method else None,
                            "batch_size": 1, "at": f"{x}x", "ms_per_token": round(at[x], 3),
                            "tokens_per_sec": round(1000 / at[x], 1), "ratio": round(at[x] / at[1], 2)})
    return results


def _nanogpt_stream(model: GPT, idx: torch.Tensor, n: int):
    """nanoGPT's generate as a stream: every new token recomputes the whole (cropped) context."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        next_token = sample_next(logits[:, -1, :], temperature=0)
        idx = torch.cat([idx, next_token], dim=1)
        yield next_token


def bench_serve(cfg: BenchConfig, gpt: GPTConfig, device: str, dtype: torch.dtype,
                quantize: str = "none") -> list[dict]:
    """serve.py in this process on 127.0.0.1, and for each --serve_clients count that many streaming clients at once,
    each a different random prompt_len-token prompt and decode_tokens greedy tokens.

    tokens_per_sec: all clients' tokens over the time from the first request to the last token; ttft: time to first
    token per client, latency: to its last (median, p95); rss: this process's resident memory (read every 20 ms)
    with the model loaded and idle, its peak during the round, and once the server is idle again. The clients are threads of another process, so that
    they do not share the server's GIL; they share its CPU, as local clients do.
    """
    try:
        import uvicorn

        from serve import ServeConfig, create_app
    except ImportError:
        raise SystemExit("--what=serve needs the serve extra: pip install -e '.[serve]'") from None
    from tokens import Tokenizer

    torch.manual_seed(cfg.seed)
    model = quantize_model(GPT(gpt).to(device=device, dtype=dtype).eval(), quantize, torch.device(device))
    # Prompts are token ids, so the tokenizer only decodes: GPT-2 BPE for BPE-sized vocabularies, else any chars.
    tokenizer = Tokenizer.tiktoken("gpt2") if gpt.vocab_size >= 50257 else \
        Tokenizer.char("".join(chr(0x100 + i) for i in range(gpt.vocab_size)))
    tokenizer.encode("")  # the BPE files load now: offline, serve.py's one line rather than failed rounds
    counts = [int(c) for c in cfg.serve_clients.split(",")]
    app = create_app(model, tokenizer, ServeConfig(max_sequences=max(counts + [5]), max_waiting=max(counts + [5]),
                                                   max_tokens=max(cfg.decode_tokens, 2000)), cfg.model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = sock.getsockname()[1]
    results = []
    try:
        for clients in [1, *counts]:  # the first round warms up, untimed
            idle = _rss_mb()
            prompts = torch.randint(0, gpt.vocab_size, (clients, cfg.prompt_len)).tolist()
            peak, done = [idle], threading.Event()

            def watch() -> None:
                while not done.wait(0.02):
                    peak[0] = max(peak[0], _rss_mb())

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                out = subprocess.run([sys.executable, "-c", _CLIENTS, str(port), str(cfg.decode_tokens),
                                      json.dumps(prompts)], capture_output=True, text=True, check=True, timeout=3600)
            finally:
                done.set()
                watcher.join()
            runs = json.loads(out.stdout)  # [(start, first token, end, tokens)] per client, or an error's text
            failed = [r for r in runs if isinstance(r, str) or r[1] is None]
            if failed:
                raise SystemExit(f"--what=serve: {len(failed)} of {clients} clients got no tokens, e.g. {failed[0]}")
            while any(app.state.scheduler.load().values()):
                time.sleep(0.01)
            time.sleep(0.5)  # the worker hands freed memory back once idle (serve.py's malloc_trim)
            t0, t_end = min(r[0] for r in runs), max(r[2] for r in runs)
            ttft = sorted(1000 * (r[1] - r[0]) for r in runs)
            latency = sorted(1000 * (r[2] - r[0]) for r in runs)
            results.append({"what": "serve", "clients": clients, "prompt_len": cfg.prompt_len,
                            "new_tokens": cfg.decode_tokens, "tokens": sum(r[3] for r in runs),
                            "tokens_per_sec": round(sum(r[3] for r in runs) / (t_end - t0), 1),
                            "client_tokens_per_sec": round(statistics.median(r[3] / (r[2] - r[0]) for r in runs), 2),
                            "ttft_ms": round(statistics.median(ttft)), "ttft_ms_p95": round(_p95(ttft)),
                            "ttft_ms_max": round(ttft[-1]), "latency_ms": round(statistics.median(latency)),
                            "latency_ms_p95": round(_p95(latency)),
                            "rss_mb": f"{idle:.0f} / {peak[0]:.0f} / {_rss_mb():.0f}"})
        if cfg.serve_pause:
            results.append(_serve_pause(cfg, gpt, port))
    finally:
        server.should_exit = True
        thread.join()
    return results[1:]


def _serve_pause(cfg: BenchConfig, gpt: GPTConfig, port: int) -> dict:
    """4 clients stream greedy tokens; once they run, a fifth sends a serve_pause-token prompt (cropped to
    block_size) for one token. step_ms: the streams' median time between tokens before it came; pause_ms: their
    longest while it was prefilled."""
    streams = torch.randint(0, gpt.vocab_size, (4, cfg.prompt_len)).tolist()
    long = torch.randint(0, gpt.vocab_size, (min(cfg.serve_pause, gpt.block_size),)).tolist()
    out = subprocess.run([sys.executable, "-c", _PAUSE, str(port), json.dumps(streams), json.dumps(long)],
                         capture_output=True, text=True, check=True, timeout=3600)
    arrivals, (sent, done) = json.loads(out.stdout)
    before = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b < sent]
    during = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b > sent and a < done]
    return {"what": "serve", "clients": f"4 + {len(long)}-token prompt", "prompt_len": cfg.prompt_len,
            "step_ms": round(1000 * statistics.median(before)), "pause_ms": round(1000 * max(during, default=0)),
            "prefill_ms": round(1000 * (done - sent))}


# bench_serve's pause round: argv = port, JSON prompts of the streams, JSON long prompt; prints each stream's token
# arrival times, and when the long prompt was sent and answered.
_PAUSE = """
import http.client, json, sys, threading, time
port, streams, long = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
arrivals, started, span = [[] for _ in streams], threading.Barrier(len(streams) + 1), []

def post(body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn.getresponse()

def stream(i):
    response = post({"prompt": streams[i], "max_tokens": 2000, "temperature": 0, "stream": True})
    for line in response:
        if line.startswith(b"data: {"):
            arrivals[i].append(time.perf_counter())
            if len(arrivals[i]) == 5:
                started.wait()
            if len(span) == 2 and time.perf_counter() > span[1] + 2:
                break

threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
for t in threads:
    t.start()
started.wait()
time.sleep(0.5)
span.append(time.perf_counter())
post({"prompt": long, "max_tokens": 1, "temperature": 0}).read()
span.append(time.perf_counter())
for t in threads:
    t.join()
print(json.dumps([arrivals, span]))
"""


def _p95(sorted_values: list[float]) -> float:
    """The 95th percentile (nearest rank) of sorted values."""
    return sorted_values[max(0, -(-95 * len(sorted_values) // 100) - 1)]


# The streaming clients of bench_serve: argv = port, max_tokens, JSON list of prompts; prints one tuple per client.
_CLIENTS = """
import http.client, json, sys, threading, time
port, max_tokens, prompts = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
start, runs = threading.Barrier(len(prompts)), [None] * len(prompts)

def client(i):
    body = json.dumps({"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    t0, first, tokens = time.perf_counter(), None, 0
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        runs[i] = f"HTTP {response.status}: {response.read().decode(errors='replace')[:300]}"
        return
    for line in response:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                runs[i] = chunk["error"].get("message", str(chunk))
                return
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter()
    runs[i] = (t0, first, time.perf_counter(), tokens)

threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(runs))
"""


def _rss_mb() -> float:
    """This process's resident memory now (Linux), in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) / 1024


def _device_name(device: str) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def print_table(results: list[dict]) -> None:
    columns = ["what", "method", "compile", "quantize", "at", "batch_size", "clients", "tokens_per_sec",
               "client_tokens_per_sec", "ttft_ms", "ttft_ms_p95", "ttft_ms_max", "latency_ms", "latency_ms_p95",
               "step_ms", "pause_ms", "prefill_ms", "ms_per_step", "ms_per_token", "ratio", "weights_gb_per_s",
               "of_copy", "gb_per_s", "quantize_s", "first_run_s", "mfu", "peak_memory_mb", "rss_mb"]
    columns = [c for c in columns if c == "what" or any(r.get(c) is not None for r in results)]
    rows = [[str(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main(sys.argv[1:])
