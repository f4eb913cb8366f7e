"""Generate text from a checkpoint written by train.py, or from OpenAI's GPT-2.

    python sample.py --out_dir=out/shakespeare_char_cpu --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=gpt2 --start="FILE:out/prompt.txt" --temperature=0.8 --top_k=200 --stop=eot
    echo "The meaning of life is" | python sample.py --init_from=gpt2 --start=- --num_samples=1
    python sample.py --init_from=gpt2 --device=cuda --compile=true   # static KV cache + CUDA graphs

Each sample is printed as the prompt followed by its continuation, then a line of dashes (as nanoGPT prints them);
standard output carries only the samples, so it can be piped. The settings and the speed go to standard error. All
samples are generated together as one batch, and each is printed as soon as it is complete; on a terminal the first
one streams as it is generated. The tokenizer is the checkpoint's own (its config.json says which).
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import functools
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from checkpoint import load_for_inference
from config import (DTYPES, check_compiler, format_config, parse_config, read_prompt, resolve_device, resolve_dtype,
                    set_threads, synchronize)
from model import GPT, causal_mask, slot_positions
from quantize import Int8Linear, check_quantize
from sampling import check_sampling
from tokens import Tokenizer

SEPARATOR = "---------------"  # printed after every sample, as nanoGPT's sample.py does


@dataclass
class SampleConfig:
    out_dir: str = "out"  # training output folder to sample from (see --checkpoint), or a checkpoint folder
    init_from: str | None = None  # gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder; none/resume: out_dir
    checkpoint: str = "latest"  # which checkpoint of out_dir: latest or best (lowest validation loss)
    start: str = "\n"  # the prompt; "FILE:path" reads it from a file, "-" from standard input; "" = end-of-text (BPE)
    num_samples: int = 10  # samples to draw, generated together as one batch
    max_new_tokens: int = 500  # tokens generated per sample (fewer when `stop` ends it)
    temperature: float = 0.8  # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
    top_k: int | None = 200  # sample only among the k likeliest tokens (none: no limit)
    top_p: float | None = None  # nucleus sampling: only the likeliest tokens whose probabilities add up to p (none: off)
    seed: int = 1337  # seed of the sampling generator: the same seed gives the same text on one device and dtype
    device: str = "auto"  # cpu, cuda, cuda:1, mps; auto: cuda when available, else cpu
    dtype: str = "auto"  # float32, bfloat16 or float16 (the weights are cast); auto: bfloat16 on CUDA, else float32
    threads: int | None = None  # torch CPU threads; none: $OMP_NUM_THREADS, else the idle cores (docs/training.md: Threads); 0: one per core
    quantize: str = "none"  # none, or int8: weights stored as int8, one scale per output channel (CPU; quantize.py)
    compile: bool = False  # fixed-shape KV cache and torch.compile'd decode step (CUDA graphs on a GPU; int8's fast path)
    stop: str | None = None  # end each sample at the end-of-text token ("eot") or before this string (\n = newline)
    out_file: str | None = None  # also write the samples to this file
    stream: bool | None = None  # print the first sample's text as it is generated; none: on a terminal

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)  # ValueError -> one line from parse_config
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.checkpoint not in ("latest", "best"):
            raise ValueError(f"checkpoint must be latest or best, got {self.checkpoint!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        check_quantize(self.quantize)
        if self.stop == "":
            raise ValueError("stop must not be empty: pass none, eot, or the string to stop before")
        out = Path(self.out_file) if self.out_file is not None else None
        if out is not None and not out.parent.is_dir():
            raise ValueError(f"out_file={self.out_file}: the folder {out.parent} does not exist")
        if out is not None and out.is_dir():  # found now, not after generating everything
            raise ValueError(f"out_file={self.out_file} is a folder: pass a file path")
        if out is not None and not os.access(out.parent, os.W_OK):
            raise ValueError(f"out_file={self.out_file}: the folder {out.parent} is not writable")


# ---------------------------------------------------------------------------------------------------------- decoding

class StaticKVCache:
    """The compiled decode step's cache (gpt-fast's recipe): fixed shapes and addresses, read whole under a mask, so
    that a CUDA graph recorded once replays at every position. Follows model.py's KVCache protocol and rolls as it
    does (position p in slot p % max_len); the positions come in as a tensor, set by step()."""

    def __init__(self, model: GPT, batch_size: int, max_len: int | None = None) -> None:
        import torch._dynamo as dynamo  # here, not at the top: it adds ~1.4 s to every script's start-up

        c, p = model.config, model.transformer.wte.weight
        self.max_len = max_len or (max(c.block_size, c.window) if c.rolling else c.block_size)
        # zeros: masked keys are still multiplied (by 0), and 0 * NaN from never-written memory is NaN. One tensor
        # per layer: the compiled step updates a whole input in place, where it copied a shared (L, ...) tensor whole
        # at every layer's update of its slice (measured on the CPU)
        shape = (batch_size, c.kv_heads, self.max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layer)]
        for t in self.k + self.v if p.is_cuda else []:  # on a CPU (no graph), frozen int8 steps would fold them
            dynamo.mark_static_address(t)  # lets a CUDA graph update the cache in place
        self.batch_size, self.pos = batch_size, 0
        self.input_pos = torch.zeros(0, dtype=torch.long, device=p.device)  # (T,): this forward's positions

    def reset(self) -> None:
        self.pos = 0  # stale keys stay, hidden by the mask

    def step(self, forward: Callable[[torch.Tensor, StaticKVCache], torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """forward(idx, self)'s logits (B, T, vocab_size), idx (B, T) at the next T positions. The positions are
        set here, outside the compiled function, which would otherwise specialise on the int `pos`."""
        self.input_pos = torch.arange(self.pos, self.pos + idx.size(1), device=idx.device)  # (T,)
        self.pos += idx.size(1)
        return forward(idx, self)

    def begin(self, T: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        k_pos = slot_positions(self.input_pos[-1] + 1, self.max_len, self.input_pos.device)  # a tensor: one graph
        return self.input_pos, causal_mask(self.input_pos, k_pos, window), self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.input_pos % self.max_len
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))  # .to: k is bf16 under autocast
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


def forward_static(model: GPT, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Logits (B, T, vocab_size) of idx at cache.input_pos: the function compiled into the decode step."""
    return model(idx, kv_cache=cache)[0]


def static_step(model: GPT, cache: StaticKVCache,
                decode: Callable[[torch.Tensor, StaticKVCache], torch.Tensor] | None = None,
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """generate_stream's step on a static cache: one-token steps through decode (compiled_decode_step's), a
    prefill through the eager forward_static."""
    eager = functools.partial(forward_static, model)

    def step(idx: torch.Tensor) -> torch.Tensor:
        if model.config.rolling:  # RoPE tables grown out here: inside, the graph would be captured again
            model.rope_at(idx[:, :0], cache.pos + idx.size(1))
        return cache.step(decode if decode is not None and idx.size(1) == 1 else eager, idx)
    return step


_compiled: dict[str, Callable] = {}  # torch.compile'd forward_static, one per compile mode
# model -> {(batch size, device, dtype): StaticKVCache}: a model moved or cast since its first use gets new caches
_static_caches: weakref.WeakKeyDictionary[GPT, dict[tuple, StaticKVCache]] = weakref.WeakKeyDictionary()


def compiled_decode_step(model: GPT) -> Callable[[torch.Tensor, StaticKVCache], torch.Tensor]:
    """forward_static under torch.compile, bound to model.

    There is one torch.compile'd function per mode, shared by every model: dynamo captures it on its first call and
    captures it again when its guards fail (another model shape, device, dtype or batch size).

    On CUDA mode="reduce-overhead" replays the one-token step as a CUDA graph: at batch 1, GPT-2 124M runs ~100
    small kernels per token, and launching them one by one from Python would take longer than running them.
    A model with int8 weights (CPU) is compiled with its weights frozen into the graph as constants, which lets
    inductor's C++ GEMM template (max-autotune) multiply by them in place of torch's eager kernel, ~2x faster
    (docs/int8.md); weights changed in place later are not seen by the compiled step. The settings are patched
    around each call, not given as torch.compile's options: dynamo reads `freezing` while it traces.
    """
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    mode = "reduce-overhead" if model.transformer.wte.weight.is_cuda else "int8" if int8 else "default"
    if mode not in _compiled:  # dynamic=False: a new batch size gets its own fixed-shape graph, not a dynamic one
        _compiled[mode] = torch.compile(forward_static, mode=None if mode == "int8" else mode, dynamic=False)
    if mode != "int8":
        return functools.partial(_compiled[mode], model)
    import torch._inductor.config as inductor_config  # torch.compile has imported it: no start-up cost

    def step(idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        with inductor_config.patch(INT8_INDUCTOR), torch.no_grad():  # freezing needs grad off when it compiles
            return _compiled[mode](model, idx, cache)
    return step


# Freezing turns the weights into constants, which inductor's C++ GEMM template needs to pack them; max-autotune
# times it against torch's kernel per matrix shape, once (inductor caches the choice and the code on disk).
INT8_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                 "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet stderr


def static_cache_len(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    """Slots of the static cache for one generation: what it fills, in steps of 64 so that nearby lengths share a
    compiled step, at most block_size; a rolling model's whole window. Reading block_size slots at every step would
    add ~75 MB to GPT-2's 500 MB (fp32) or 124 MB (int8) of weights per token."""
    c = model.config
    if c.rolling:
        return max(c.block_size, c.window)
    return min(c.block_size, -(-(min(prompt_len, c.block_size) + max(max_new_tokens, 1) - 1) // 64) * 64)


def cuda_graphs_recorded(device: torch.device) -> int | None:
    """How many CUDA graphs torch.compile's mode="reduce-overhead" has recorded on device so far; 0 off CUDA, None
    when this torch keeps them where this cannot look.

    Inductor falls back to plain kernel launches without an error (a mutated input, a CPU tensor): a difference
    before and after a compiled call tells whether it really runs as a graph. Reads inductor's private graph trees;
    scripts/gpu_check.sh's first step tries it on the torch it runs with.
    """
    if device.type != "cuda":
        return 0
    try:
        from torch._inductor import cudagraph_trees

        index = device.index if device.index is not None else torch.cuda.current_device()
        manager = cudagraph_trees.get_manager(index, create_if_none_exists=False)
        nodes = [node for roots in manager.roots.values() for node in roots] if manager is not None else []
        count = 0
        while nodes:  # one tree per compiled function: its root and a child per path recorded after it
            node = nodes.pop()
            count += 1
            nodes += [child for children in node.children.values() for child in children]
        return count
    except (ImportError, AttributeError, TypeError):
        return None


def compiled_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None, max_len: int | None = None) -> torch.Tensor:
    """model.generate through a static KV cache and the compiled decode step: the same tokens, (B, T + new)."""
    new = compiled_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, max_len)
    return torch.cat([idx, *new], 1)


def compiled_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, max_len: int | None = None) -> Iterator[torch.Tensor]:
    """model.generate_stream through a static KV cache of max_len slots (static_cache_len's when None) and the
    compiled decode step.

    The cache is kept per model, batch size, device and dtype and reused while max_len stays, so that a CUDA graph
    recorded once stays valid: it replays at the addresses it was recorded with. Each (batch size, max_len) is a
    graph of its own, captured on first use; past torch._dynamo's recompile limit (8) the step runs eagerly.
    """
    weight = model.transformer.wte.weight
    max_len = max_len or static_cache_len(model, idx.size(1), max_new_tokens)
    key = (idx.size(0), weight.device, weight.dtype)
    caches = _static_caches.setdefault(model, {})
    if key not in caches or caches[key].max_len != max_len:  # one cache per key: the latest length
        caches[key] = StaticKVCache(model, idx.size(0), max_len)
    if model.config.rolling:  # RoPE tables for every position at once: each growth captures the graph again
        model.rope_at(idx[:, :0], idx.size(1) + max_new_tokens)
    return model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator,
                                 step=static_step(model, caches[key], compiled_decode_step(model)), cache=caches[key])


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """tokenizer.decode, with ids past the tokenizer's vocabulary shown as U+FFFD.

    The model's vocabulary may be padded (GPT-2's 50257 to 50304, for faster matmuls); a trained model gives those
    ids ~zero probability, but an untrained one picks them, and they have no text.
    """
    if max(ids, default=0) < tokenizer.vocab_size:
        return tokenizer.decode(ids)
    parts, begin = [], 0
    for i, token in enumerate(ids):
        if token >= tokenizer.vocab_size:
            parts += [tokenizer.decode(ids[begin:i]), "\ufffd"]
            begin = i + 1
    return "".join(parts + [tokenizer.decode(ids[begin:])])


class Continuation:
    """The text one sample adds to its prompt, token by token, and whether a stop condition has ended it.

    A character may span several tokens (GPT-2 BPE works on bytes), so tokens are decoded together, not one by one:
    only the ids since the last complete character are decoded again at each step. Stop strings are matched as the
    text grows (Knuth-Morris-Pratt), so a step costs the same however long the stop strings are.
    """

    def __init__(self, tokenizer: Tokenizer, stop_token: int | None,
                 stop_text: str | tuple[str, ...] | None) -> None:
        self.tokenizer, self.stop_token, self.stop_text = tokenizer, stop_token, stop_text
        self._stops = (stop_text,) if isinstance(stop_text, str) else tuple(stop_text or ())  # serve.py passes several
        self.ids: list[int] = []
        self.text = ""
        self.done = False
        self.generated = 0  # tokens generated for this sample, a stop token included
        self._fixed_ids, self._fixed_text = 0, ""  # a prefix ending on a character boundary, decoded once
        self._matched = [0] * len(self._stops)  # characters of each stop string that end the fixed text

    def extend(self, ids: list[int]) -> None:
        """Many tokens at once, when there is no stop condition to check on the way."""
        assert self.stop_token is None and self.stop_text is None
        self.ids += ids
        self.generated += len(ids)
        self.text = decode(self.tokenizer, self.ids)

    def add(self, token: int) -> None:
        if self.done:
            return  # the batch goes on for the other samples; this one has ended
        self.generated += 1
        if token == self.stop_token:
            self.done = True
            return
        self.ids.append(token)
        tail = decode(self.tokenizer, self.ids[self._fixed_ids:])
        start = len(self._fixed_text)  # text that earlier steps searched for the stop strings already
        self.text = self._fixed_text + tail
        if tail.endswith("\ufffd"):  # a character still misses bytes: search what may end in it, keep no state
            cuts = [cut for stop in self._stops if (cut := self.text.find(stop, max(0, start - len(stop) + 1))) >= 0]
        else:  # ends on a complete character: later tokens cannot change the text so far
            self._fixed_ids, self._fixed_text = len(self.ids), self.text
            cuts = [cut for i in range(len(self._stops)) if (cut := self._match(i, tail, start)) >= 0]
        if cuts:  # the earliest stop string wins
            self.text, self.done = self.text[:min(cuts)], True

    def _match(self, i: int, chars: str, start: int) -> int:
        """Extend stop string i's match over chars (the text from `start`); where a whole match begins, else -1."""
        stop, fallback, k = self._stops[i], _fallback(self._stops[i]), self._matched[i]
        for j, c in enumerate(chars):
            while k and stop[k] != c:
                k = fallback[k - 1]
            if stop[k] == c:
                k += 1
            if k == len(stop):
                return start + j + 1 - k
        self._matched[i] = k
        return -1

    def settled(self) -> str:
        """The part of the text that later tokens cannot change: this much can be printed while streaming."""
        if self.done:
            return self.text
        if not self._stops:
            return self.text.rstrip("\ufffd")  # a multi-byte character may still be missing its last bytes
        # hold back the text after the last complete character, and an ending that may grow into a stop string
        return self._fixed_text[:len(self._fixed_text) - max(self._matched)]


@functools.lru_cache(maxsize=64)
def _fallback(stop: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt's table: for each prefix stop[:k + 1], the length of its longest proper prefix that is
    also a suffix of it."""
    table, k = [0] * len(stop), 0
    for j in range(1, len(stop)):
        while k and stop[j] != stop[k]:
            k = table[k - 1]
        if stop[j] == stop[k]:
            k += 1
        table[j] = k
    return tuple(table)


def generate_samples(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SampleConfig,
                     generator: torch.Generator, stream_to: TextIO | None = None,
                     on_done: Callable[[int, str], None] | None = None,
                     progress: bool = False) -> tuple[list[str], dict]:
    """Continue prompt_ids num_samples times in one batch; the continuations' texts and timing figures.

    With stream_to, the first sample's text is written there as it settles, with the same characters in the end.
    on_done(i, text) is called for each sample in order, as soon as it and the samples before it are complete.
    progress: a progress bar of the steps on standard error.
    """
    stop_token = tokenizer.eot_token if cfg.stop == "eot" else None
    stop_text = cfg.stop.replace("\\n", "\n").replace("\\t", "\t") if cfg.stop not in (None, "eot") else None
    samples = [Continuation(tokenizer, stop_token, stop_text) for _ in range(cfg.num_samples)]
    watch = cfg.stop is not None or stream_to is not None  # the host must see each token as it comes
    device = model.transformer.wte.weight.device
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)  # (num_samples, T)

    printed = 0
    finished = 0  # samples passed to on_done
    pending = []  # tokens left on the device until the end when nothing needs them sooner (no sync per step)
    t0 = time.perf_counter()
    t_first = t0
    steps = 0
    if cfg.compile:
        tokens = compiled_stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    else:
        tokens = model.generate_stream(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    bar = tqdm(total=cfg.max_new_tokens, desc="sampling", unit="step", leave=False, disable=not progress)
    for steps, token in enumerate(tokens, start=1):  # token: (num_samples, 1)
        bar.update()
        if steps == 1:
            synchronize(device)
            t_first = time.perf_counter()  # prefill done
        if not watch:
            pending.append(token)
            continue
        for sample, t in zip(samples, token[:, 0].tolist()):
            sample.add(t)
        if stream_to is not None and finished == 0:
            settled = samples[0].settled()
            stream_to.write(settled[printed:])
            stream_to.flush()
            printed = len(settled)
        while on_done is not None and finished < len(samples) and samples[finished].done:
            on_done(finished, samples[finished].text)
            finished += 1
        if all(s.done for s in samples):
            break
    bar.close()
    synchronize(device)
    t_end = time.perf_counter()
    if pending:
        for sample, row in zip(samples, torch.cat(pending, dim=1).tolist()):  # one transfer for the whole batch
            sample.extend(row)
    if stream_to is not None and finished == 0:
        stream_to.write(samples[0].text[printed:])
    for i in range(finished, len(samples) if on_done is not None else 0):
        on_done(i, samples[i].text)
    new_tokens = sum(s.generated for s in samples)  # fewer than num_samples x steps where samples stopped early
    timing = {"steps": steps, "new_tokens": new_tokens, "prefill_s": t_first - t0, "total_s": t_end - t0,
              "decode_tokens_per_s": (new_tokens - cfg.num_samples) / (t_end - t_first) if steps > 1 else None}
    return [s.text for s in samples], timing


# ---------------------------------------------------------------------------------------------------------- setup


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from the end-of-text token where the tokenizer has one."""
    if text == "":
        if tokenizer.eot_token is None:
            raise SystemExit("the prompt is empty and a char tokenizer has no end-of-text token to start from: "
                             "pass some text, e.g. --start='\\n' (the default)")
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise SystemExit(f"the prompt cannot be encoded: {e}") from None


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    print(format_config(cfg), file=sys.stderr)  # stderr: standard output carries only the samples
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.temperature == 0 and cfg.num_samples > 1:  # a warning, not an error: num_samples defaults to 10
        print(f"warning: temperature=0 is greedy, so the {cfg.num_samples} samples will be identical: pass "
              f"--num_samples=1, or a temperature above 0 for different ones", file=sys.stderr)

    check_compiler(device, cfg.compile)
    prompt = read_prompt(cfg.start)  # before loading: a closed standard input fails at once
    # Cast the weights rather than autocast: decoding reads every weight once per token, so half-size weights
    # halve the memory traffic, where autocast would read fp32 weights and cast them again at every step.
    model, tokenizer, _, _ = load_for_inference(cfg.out_dir, cfg.init_from, cfg.checkpoint, device, dtype,
                                               cfg.quantize)
    if cfg.stop == "eot" and tokenizer.eot_token is None:
        raise SystemExit("--stop=eot: this model's char tokenizer has no end-of-text token; stop at a string "
                         "instead, e.g. --stop='\\n\\n'")

    prompt_ids = encode_prompt(tokenizer, prompt)
    if len(prompt_ids) > model.config.block_size and not model.config.rolling:  # a window model reads it all
        print(f"the prompt has {len(prompt_ids)} tokens, more than block_size {model.config.block_size}: the model "
              f"sees only its last {model.config.block_size}", file=sys.stderr)
    if cfg.compile:
        t, graphs = time.perf_counter(), cuda_graphs_recorded(device)
        max_len = static_cache_len(model, len(prompt_ids), cfg.max_new_tokens)  # the graph the samples will use
        if model.config.rolling:  # and its RoPE tables: a table grown later would capture the graph again
            model.rope_at(torch.zeros(0, dtype=torch.long, device=device), len(prompt_ids) + cfg.max_new_tokens)
        compiled_generate(model, torch.tensor([prompt_ids[-1:]] * cfg.num_samples, device=device), 4, max_len=max_len)
        print(f"compiled the decode step in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if device.type == "cuda" and graphs is not None and cuda_graphs_recorded(device) == graphs:
            print("warning: the compiled decode step was not captured as a CUDA graph, so it launches each kernel "
                  "from Python: TORCH_LOGS=perf_hints says why", file=sys.stderr)

    stream = cfg.stream if cfg.stream is not None else sys.stdout.isatty()
    if stream:
        sys.stdout.write(prompt)

    def print_sample(i: int, text: str) -> None:  # each as soon as it is complete; the streamed one has its text out
        sys.stdout.write(f"\n{SEPARATOR}\n" if stream and i == 0 else f"{prompt}{text}\n{SEPARATOR}\n")
        sys.stdout.flush()

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    continuations, timing = generate_samples(model, tokenizer, prompt_ids, cfg, generator,
                                             stream_to=sys.stdout if stream else None, on_done=print_sample,
                                             progress=not stream and sys.stderr.isatty())
    samples = [prompt + text for text in continuations]
    if cfg.out_file is not None:
        with errors.writing(cfg.out_file):
            Path(cfg.out_file).write_text("".join(f"{s}\n{SEPARATOR}\n" for s in samples), encoding="utf-8")

    new_tokens = timing["new_tokens"]
    rate = f", then {timing['decode_tokens_per_s']:.1f} tokens/s" if timing["decode_tokens_per_s"] else ""
    print(f"{new_tokens} new tokens ({cfg.num_samples} sample(s), {timing['steps']} steps) in {timing['total_s']:.2f} s "
          f"({new_tokens / timing['total_s']:.1f} tokens/s; prefill of {len(prompt_ids)} tokens "
          f"{timing['prefill_s']:.3f} s{rate})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python sample.py ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        sys.exit(141)
