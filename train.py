"""Train a GPT from scratch, resume a run, or fine-tune GPT-2: on a laptop CPU, one GPU, or many GPUs with torchrun.

    python train.py configs/shakespeare_char_cpu.toml                          # a CPU, about 60 s on 2 idle cores
    python train.py configs/shakespeare_char.toml                              # one GPU
    python train.py configs/shakespeare_char.toml --init_from=resume           # continue the run in out_dir
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.toml   # eight GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py CONFIG.toml
                                                                               # the same command on each of 2 nodes
    python train.py --help                                                     # every setting, with its default

Settings resolve as TrainConfig's defaults < the TOML file < --key=value. The run writes into out_dir: checkpoints
(ckpt_NNNNNN/ with `latest` and `best` links, see checkpoint.py), metrics.jsonl (one JSON object per log line or
evaluation) and loss.png (when matplotlib is installed). A resumed run takes the model's shape, the weights and the
optimizer's state from the checkpoint and every other setting (max_iters, betas, weight_decay, ...) from its own
command line; when the checkpoint is already at max_iters it says so and exits.

Reproducibility: the data windows and dropout masks of a step come from (seed, iteration, micro-step) alone, so a
step's global batch is the same whatever the number of processes, and 40 iterations plus a resume to 80 end with the
same weights as 80 straight.

One train.py at a time writes an out_dir: a second is refused, naming the first's pid. What a run survives (Ctrl-C,
SIGTERM, kill -9, NaNs, divergence, out of memory) is docs/training.md's "What survives what"; tests/test_train.py
injects each.
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import math
import os
import re
import signal
import sys
import time
from itertools import count, islice
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import HUB_MODELS, check_out_dir, load_for_training, restore_train_state, save_checkpoint, train_state
from config import (autocast_context, check_compiler, config_to_dict, device_peak_flops, enable_tf32, format_config,
                    parse_config, resolve_device, resolve_dtype, set_threads)
from model import GPT, GPTConfig
from runlog import (Metrics, OutDirLock, ProgressBar, StopSignal, diverged, eval_bar, loss_text, out_of_memory,
                    plot_losses, stopped, summary, warn_if_slow)
from trackers import Trackers, check_log_to
from tokens import Dataset, load_dataset, padded_vocab_size

@dataclass
class TrainConfig(GPTConfig):
    """GPTConfig's fields (the model: n_layer, n_head, the switches...; ignored when resuming or fine-tuning, where
    the checkpoint's shape is used), then the run's."""
    vocab_size: int = field(default=GPTConfig.vocab_size, init=False)  # not a setting: the dataset's, see gpt_config
    # output and evaluation
    out_dir: str = "out"  # folder for checkpoints, metrics.jsonl and loss.png
    log_to: str = ""  # also send metrics.jsonl's lines to tensorboard and/or wandb (comma-separated; trackers.py)
    eval_interval: int = 2000  # evaluate train/val loss and save a checkpoint every this many iterations, and at the end
    log_interval: int = 1  # report loss, tokens/s and MFU every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation (the same batches every time)
    eval_only: bool = False  # evaluate the initial (or resumed, or pretrained) model once, then exit
    init_from: str = "scratch"  # scratch, resume (out_dir's latest checkpoint), gpt2[-medium|-large|-xl], or a model folder
    # data
    dataset: str = "openwebtext"  # a folder under data/ (prepared by its prepare.py) or the path of a prepared folder
    gradient_accumulation_steps: int = 40  # micro-steps per optimizer step, over all processes together
    batch_size: int = 12  # sequences per micro-step in each process
    # optimizer
    optimizer: str = "adamw"  # adamw, or muon: Muon (muon_*) for the matrices in the blocks, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as it scales learning_rate)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum, reached after muon_momentum_warmup iterations
    muon_momentum_warmup: int = 300  # iterations over which Muon's momentum rises linearly from 0.85
    muon_weight_decay: float = 0.0  # decoupled weight decay of the Muon matrices (lr * wd per step)
    # AdamW (with optimizer=muon: the embeddings, head, biases and norms)
    learning_rate: float = 6e-4  # peak learning rate, reached after warmup_iters
    max_iters: int = 600000  # optimizer steps of the whole run
    weight_decay: float = 0.1  # AdamW weight decay on the 2-D weights (not on biases and LayerNorms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 disables clipping
    # learning-rate schedule
    decay_lr: bool = True  # warmup then lr_schedule's decay; false keeps learning_rate constant
    lr_schedule: str = "cosine"  # cosine (decay to min_lr at lr_decay_iters) or wsd (constant, then linear cool-down)
    cooldown_frac: float = 0.5  # wsd: the linear cool-down to min_lr takes this last fraction of lr_decay_iters
    warmup_iters: int = 2000  # iterations of linear warmup from ~0 to learning_rate
    lr_decay_iters: int = 600000  # iteration at which the cosine reaches min_lr (~max_iters, per Chinchilla)
    min_lr: float = 6e-5  # learning rate after the decay (~learning_rate / 10, per Chinchilla)
    # system
    device: str = "auto"  # cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu
    dtype: str = "auto"  # bfloat16, float16 (with a gradient scaler) or float32; auto: bfloat16 where CUDA has it, else float32
    compile: bool | None = None  # torch.compile the model; none: on for CUDA, off elsewhere
    threads: int | None = None  # torch CPU threads; none: $OMP_NUM_THREADS, else the idle cores (docs/training.md: Threads); 0: one per core
    backend: str = "auto"  # torch.distributed backend under torchrun: nccl or gloo; auto: nccl on CUDA, gloo on CPU
    seed: int = 1337  # seeds the initial weights, the data windows and the dropout masks
    peak_flops: float | None = None  # the device's peak FLOP/s for MFU; none: looked up (H100, A100...), else no MFU
    max_skipped_steps: int = 5  # stop after this many optimizer steps in a row with a NaN/Inf loss or gradient

    def __post_init__(self) -> None:
        for name in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                     "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "seed", "muon_momentum_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise ValueError(f"learning_rate must be > 0 and min_lr >= 0, got {self.learning_rate} and {self.min_lr}")
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}): the decay would "
                             f"raise the rate; lower --min_lr (learning_rate / 10 is usual) or set --decay_lr=false")
        if self.decay_lr and self.lr_decay_iters < self.warmup_iters:
            raise ValueError(f"lr_decay_iters ({self.lr_decay_iters}) must be >= warmup_iters ({self.warmup_iters}): "
                             f"the cosine decay starts when the warmup ends")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0 (grad_clip=0 disables clipping), got "
                             f"{self.weight_decay} and {self.grad_clip}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend must be auto, nccl or gloo, got {self.backend!r}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive (e.g. 989e12 for an H100 in bf16), got {self.peak_flops}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "wsd") or not 0.0 < self.cooldown_frac <= 1.0:
            raise ValueError(f"lr_schedule must be cosine or wsd and cooldown_frac in (0, 1], got "
                             f"{self.lr_schedule!r} and {self.cooldown_frac}")
        if self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0 or self.muon_weight_decay < 0:
            raise ValueError(f"muon_lr must be > 0, muon_momentum in [0, 1), muon_weight_decay >= 0; got "
                             f"{self.muon_lr}, {self.muon_momentum}, {self.muon_weight_decay}")
        check_log_to(self.log_to)
        super().__post_init__()  # GPTConfig checks the model's fields (sizes, switches), naming the wrong one
        if self.init_from not in ("scratch", "resume", *HUB_MODELS) and not Path(self.init_from).is_dir():
            raise ValueError(f"init_from={self.init_from!r} is not scratch, resume, one of {', '.join(HUB_MODELS)} "
                             f"or an existing model folder")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model these settings describe: every GPTConfig field, and the dataset's vocabulary."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)} | {"vocab_size": vocab_size})


# ------------------------------------------------------------------------------------------------------------- main
# main() runs: setup, load_dataset (tokens.py), build_model, build_optimizer, then train: the loop, whose every
# iteration is one train_step on train_batches, with evaluate, record and save below it; finish ends the run. A
# resumed run reads its checkpoint in load_resumed; build_optimizer sets the rest of its state back. Run-keeping (the
# lock, signals, metrics.jsonl, progress lines, the summary) is runlog.py's.


def main(argv: list[str] | None = None) -> dict:
    """Run training as configured by argv (default sys.argv[1:]); returns the final iteration and losses."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(TrainConfig, argv, description=__doc__)
    writes = int(os.environ.get("RANK", 0)) == 0 and not cfg.eval_only  # only rank 0 of a training run writes
    with OutDirLock(Path(cfg.out_dir)) if writes else nullcontext():  # one run per out_dir
        run = setup(cfg, writes)
        try:
            data = load_dataset(cfg.dataset)
            model, state = build_model(cfg, run, data)
            optimizer, scaler, progress = build_optimizer(cfg, run, model, state)
            return train(cfg, run, data, model, optimizer, scaler, progress, argv)
        finally:
            if run.ddp:
                dist.destroy_process_group()


def train(cfg: TrainConfig, run: Run, data: Dataset, raw_model: GPT, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, progress: Progress, argv: list[str]) -> dict:
    """Evaluate the starting point, then train_step until max_iters, evaluating and saving every eval_interval and at
    max_iters; stop cleanly on a signal, on a diverged run (never saving it), or out of memory."""
    block_size = raw_model.config.block_size
    model = torch.compile(raw_model) if run.compile else raw_model
    train_model = DDP(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None) if run.ddp else model
    get_batch = {split: batch_sampler(files, block_size, cfg.batch_size, run.device)
                 for split, files in data.splits.items()}
    micro_steps = range(run.rank, cfg.gradient_accumulation_steps, run.world_size)  # rank r: r, r + W, r + 2W, ...
    batches = train_batches(get_batch["train"], cfg.seed, progress.iter_num, micro_steps)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    lengths = data.byte_lengths(verbose=run.master)  # for bits per byte; None without the BPE's files
    byte_lengths = None if lengths is None else torch.from_numpy(lengths).to(run.device)
    trackers = Trackers(cfg.log_to, run.out_dir, config_to_dict(cfg)) if cfg.log_to and run.writes else None
    metrics = Metrics(run.out_dir / "metrics.jsonl", run.resuming, progress.iter_num, trackers) if run.writes else None
    tokens_per_iter = cfg.batch_size * block_size * cfg.gradient_accumulation_steps
    peak_flops = cfg.peak_flops or device_peak_flops(run.device)
    if run.master and run.device.type == "cpu":
        warn_if_slow(raw_model, tokens_per_iter, 2 * cfg.eval_iters * cfg.batch_size * block_size)
    losses, stopped_by, skipped, bar = None, 0, 0, None  # skipped: updates skipped in a row (non-finite)
    with StopSignal(verbose=run.master) as stop:
        try:
            if cfg.eval_only or not run.resuming:  # the starting point: the untrained (or pretrained) model's loss
                losses = evaluate(cfg, run, model, get_batch, byte_lengths, stop)
                if losses is None:
                    stopped_by = stop.signum
                else:
                    if run.master:
                        print(f"iter {progress.iter_num}: {loss_text(losses)}")
                    record(metrics, progress, **losses, lr=learning_rate(progress.iter_num, cfg))
                if cfg.eval_only:
                    if stopped_by:
                        raise SystemExit(128 + stopped_by)
                    return {"iter_num": progress.iter_num, **losses}

            bar = ProgressBar(cfg.max_iters, progress.iter_num, tokens_per_iter, enabled=run.master)
            while progress.iter_num < cfg.max_iters and not stopped_by:
                t0 = time.perf_counter()
                lr = learning_rate(progress.iter_num, cfg)
                loss, norm, updated, stopping = train_step(cfg, run, train_model, optimizer, scaler, params, batches,
                                                           progress.iter_num, lr, stop)
                skipped = 0 if updated else skipped + 1
                if skipped:
                    bar.write(f"iter {progress.iter_num + 1}: loss {loss}, gradient norm {norm}: update skipped "
                              f"({skipped} in a row)")
                    if skipped >= cfg.max_skipped_steps:
                        raise SystemExit(diverged(f"the loss or gradient was not finite for {skipped} steps in a row "
                                                  f"(iterations {progress.iter_num + 2 - skipped}-"
                                                  f"{progress.iter_num + 1})", run.out_dir))
                progress.iter_num += 1
                bar.step(time.perf_counter() - t0)

                if progress.iter_num % cfg.log_interval == 0:
                    tokens_per_sec, smooth = bar.rates()
                    mfu = raw_model.estimate_mfu(smooth / run.world_size, peak_flops) if peak_flops and smooth else None
                    bar.show(progress.iter_num, progress.elapsed(), loss, smooth, mfu)
                    record(metrics, progress, train_loss=loss, lr=lr, tokens_per_sec=tokens_per_sec and round(tokens_per_sec, 1),
                           mfu=None if mfu is None else round(mfu, 4))

                # Evaluate before honouring a stop signal: the resumed run starts after this iteration, so it would
                # never evaluate (nor choose `best`) here.
                if progress.iter_num % cfg.eval_interval == 0 or progress.iter_num == cfg.max_iters:
                    losses = evaluate(cfg, run, model, get_batch, byte_lengths, stop)
                    if losses is None:  # stopped during it: finish() saves, without a val loss
                        stopping = True
                    else:
                        record(metrics, progress, **losses, lr=lr)
                        check_finite(raw_model, losses["val_loss"], progress.iter_num, run.out_dir)  # every rank stops
                        if run.master:
                            folder, best = save(cfg, data, raw_model, optimizer, scaler, progress, losses["val_loss"])
                            bar.write(f"iter {progress.iter_num}: {loss_text(losses)}; saved {folder}"
                                      f"{' (best)' if best else ''}")
                if stopping:
                    stopped_by = stop.signum or signal.SIGTERM  # a rank that got no signal stops because another did
        except torch.OutOfMemoryError:
            raise SystemExit(out_of_memory(run.device, cfg.batch_size, block_size,
                                           cfg.gradient_accumulation_steps)) from None
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        return finish(cfg, run, data, raw_model, optimizer, scaler, progress, losses and losses["val_loss"],
                      stopped_by, argv)


def finish(cfg: TrainConfig, run: Run, data: Dataset, model: GPT, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, progress: Progress, val_loss: float | None, stopped_by: int,
           argv: list[str]) -> dict:
    """The end of a run, after the loop's last evaluation: save the iteration if that evaluation did not (a stop
    between evaluations, or max_iters=0), draw loss.png, then exit with 128 + stopped_by (the signal that stopped the
    run; 0: none) or print the summary and return the final iteration and losses."""
    untrained = bool(stopped_by) and progress.iter_num == progress.start_iter  # stopped in the first evaluation
    if run.master and progress.saved_iter != progress.iter_num and not untrained:
        print(f"saved {save(cfg, data, model, optimizer, scaler, progress, None)[0]}")
    metrics = run.out_dir / "metrics.jsonl"
    if run.writes and metrics.exists() and metrics.stat().st_size:
        plot_losses(metrics, run.out_dir / "loss.png")
    if run.ddp:
        dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has written
    if stopped_by:
        raise SystemExit(stopped(stopped_by, run.master, untrained, progress.iter_num, argv))
    if run.master and progress.iter_num > progress.start_iter:
        print(summary(run.out_dir, progress.iter_num - progress.start_iter, time.perf_counter() - progress.t_start,
                      progress.best_val_loss))
    return {"iter_num": progress.iter_num, "val_loss": val_loss, "best_val_loss": progress.best_val_loss}


# ------------------------------------------------------------------------ one training step: batches and schedule


def train_step(cfg: TrainConfig, run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter],
               batches: Iterator[tuple[torch.Tensor, torch.Tensor, int]], iter_num: int, lr: float,
               stop: StopSignal) -> tuple[float, float, bool, bool]:
    """One optimizer step over this process's share of the gradient_accumulation_steps micro-batches, taken from
    `batches`. Returns the mean loss, the gradient norm, whether the update was applied (a non-finite loss or
    gradient skips it on every rank) and whether any rank was asked to stop. lr: learning_rate(iter_num, cfg), which
    the loop also logs."""
    for group in optimizer.param_groups:  # each group's peak rate, scaled by the schedule
        group["lr"] = group["base_lr"] * lr / cfg.learning_rate
        if group.get("muon"):
            group["momentum"] = muon_momentum(iter_num, cfg)
    loss_sum = torch.zeros((), device=run.device)
    for i, (x, y, dropout_seed) in enumerate(islice(batches, run.local_accum)):
        seed_dropout(dropout_seed, run.device)
        # DDP averages gradients over ranks when the last micro-step's backward runs; the others only accumulate
        # locally (no_sync), so each optimizer step costs one all-reduce.
        with model.no_sync() if run.ddp and i < run.local_accum - 1 else nullcontext():
            with run.autocast:
                _, loss = model(x, y)
            loss_sum += loss.detach()
            # Each rank sums local_accum losses and DDP averages over world_size ranks, so dividing by local_accum
            # here gives the mean over all accum micro-steps, whatever world_size is.
            scaler.scale(loss / run.local_accum).backward()
    scaler.unscale_(optimizer)  # a no-op unless float16: clip and check the true gradient
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    # The step's one host sync: the mean loss, the gradient norm (the same on every rank: the gradients were
    # all-reduced) and whether any rank got a stop signal. Skipping a non-finite update and stopping must be decided
    # the same way on every rank; reading three numbers once per optimizer step (not per micro-step) costs far less
    # than a step, and float16's GradScaler syncs here anyway.
    stats = torch.stack([loss_sum / run.local_accum, grad_norm.float(),
                         loss_sum.new_full((), float(stop.signum))])  # a fill kernel, no copy
    if run.ddp:
        dist.all_reduce(stats)  # SUM: loss sums over ranks, norm * W, stop > 0 if any rank was signalled
        stats /= run.world_size
    loss_value, norm_value, stop_value = stats.tolist()

    # A non-finite loss always skips. A non-finite gradient with a finite loss is, in float16, an overflow that the
    # GradScaler owns: scaler.step skips that update and scaler.update lowers the scale (it happens now and then
    # while the scale settles), so it is not counted as skipped.
    updated = math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(norm_value))
    if updated:
        scaler.step(optimizer)  # optimizer.step() unless float16
    scaler.update()  # (float16) after a skip: resets the scaler's per-step state and lowers the scale
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, updated, stop_value > 0


def batch_sampler(files: list[np.memmap], block_size: int, batch_size: int,
                  device: torch.device) -> Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """get_batch(rng) for one split: batch_size windows of block_size + 1 tokens as inputs x (B, T) and targets
    y (B, T), starting anywhere in any file (shard) alike: a shard is picked in proportion to its length, and no
    window crosses into the next. Where each file's starts begin is worked out once, here."""
    starts_per_file = [max(len(f) - block_size, 0) for f in files]  # a window needs block_size + 1 tokens
    first = np.cumsum([0, *starts_per_file])  # file i holds the starts first[i] .. first[i + 1] - 1

    def get_batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, first[-1], size=batch_size)
        which = np.searchsorted(first, starts, side="right") - 1  # the file each start falls in
        offsets = starts - first[which]
        windows = np.stack([files[f][o:o + block_size + 1] for f, o in zip(which, offsets)]).astype(np.int64)
        w = torch.from_numpy(windows)  # (B, T + 1)
        if device.type == "cuda":  # pinned memory lets the copy run while the GPU works on the previous micro-step
            w = w.pin_memory().to(device, non_blocking=True)
        else:
            w = w.to(device)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)

    return get_batch


def train_batches(get_batch: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]], seed: int,
                  iter_num: int, micro_steps: range) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """This process's training micro-batches from iteration iter_num on, as (x, y, dropout seed), one ahead: the
    next is read and (on CUDA) on its way to the device while the model works on this one.

    A micro-step's windows and dropout masks come from (seed, iteration, micro-step) alone, the micro-step counted
    over all processes: so the global batch is the same whatever the number of processes, and a resumed run reads
    what the uninterrupted one would. SeedSequence hashes the tuple (no two share a stream, as a formula such as
    seed * P + iter * Q + micro could); its leading 0 tags training, evaluation's batches use 1 and 2."""
    def fetch(it: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        data_seq, dropout_seq = np.random.SeedSequence([seed, 0, it, micro_step]).spawn(2)
        return (*get_batch(np.random.default_rng(data_seq)), int(dropout_seq.generate_state(1, np.uint64)[0]))

    steps = ((it, m) for it in count(iter_num) for m in micro_steps)
    ahead = fetch(*next(steps))
    for step in steps:
        batch, ahead = ahead, fetch(*step)
        yield batch


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the generator the dropout masks come from (the CPU's, or the current accelerator's)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # this process's GPU only: manual_seed_all would touch every visible GPU
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def learning_rate(it: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_iters, then to min_lr at lr_decay_iters, then min_lr. cosine: nanoGPT's decay.
    wsd (warmup-stable-decay, as nanochat and modded-nanogpt): constant, then linear over the last cooldown_frac."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown_start = max(cfg.warmup_iters, cfg.lr_decay_iters * (1 - cfg.cooldown_frac))
        progress = max(0.0, (it - cooldown_start) / (cfg.lr_decay_iters - cooldown_start))  # 0 -> 1
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def muon_momentum(it: int, cfg: TrainConfig) -> float:
    """Muon's momentum: 0.85 rising linearly to muon_momentum over muon_momentum_warmup iterations (modded-nanogpt)."""
    frac = min(1.0, it / cfg.muon_momentum_warmup) if cfg.muon_momentum_warmup else 1.0
    return 0.85 + frac * (cfg.muon_momentum - 0.85)


# ------------------------------------------------------------------------------------------ evaluation and saving


@torch.no_grad()
def evaluate(cfg: TrainConfig, run: Run, model: torch.nn.Module, get_batch: dict[str, Callable],
             byte_lengths: torch.Tensor | None, stop: StopSignal) -> dict[str, float | None] | None:
    """Mean loss over eval_iters batches per split ({split}_loss) and its bits per byte ({split}_bpb; None without
    the BPE's files): the same batches every time, shared out over ranks. None when a stop request came during it: a
    single process stops between two batches (under torchrun every rank finishes: their all-reduces stay matched)."""
    model.eval()
    losses = {}
    signalled_before = stop.signum  # a stop requested during the step that evaluates: evaluate, then stop
    shown = eval_bar(2 * len(range(run.rank, cfg.eval_iters, run.world_size)), enabled=run.master)
    for tag, split in ((1, "train"), (2, "val")):
        total = torch.zeros((), device=run.device)
        nbytes = torch.zeros((), dtype=torch.int64, device=run.device)  # UTF-8 bytes of the targets
        for k in range(run.rank, cfg.eval_iters, run.world_size):
            if stop.signum and not signalled_before and not run.ddp:
                shown.close()
                model.train()
                return None
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, tag, k]))
            x, y = get_batch[split](rng)
            with run.autocast:
                _, loss = model(x, y)
            total += loss.float()
            if byte_lengths is not None:
                nbytes += byte_lengths[y].sum()
            shown.update(1)
        if run.ddp:
            dist.all_reduce(total)
            dist.all_reduce(nbytes)
        losses[f"{split}_loss"] = total.item() / cfg.eval_iters
        # every batch has batch_size * block_size targets: nats = mean loss * all targets
        nats = losses[f"{split}_loss"] * cfg.eval_iters * cfg.batch_size * x.size(1)
        losses[f"{split}_bpb"] = nats / math.log(2) / max(nbytes.item(), 1) if byte_lengths is not None else None
    shown.close()
    model.train()
    return losses


def record(metrics: Metrics | None, progress: Progress, **values: float | None) -> None:
    """One metrics.jsonl line, null where a key does not apply (rank 0 of a training run; metrics is None elsewhere)."""
    if metrics is not None:
        row = {"iter": progress.iter_num, "train_loss": None, "val_loss": None, "train_bpb": None, "val_bpb": None,
               "lr": None, "tokens_per_sec": None, "mfu": None, "elapsed": round(progress.elapsed(), 3)}
        metrics.write(row | values)


def save(cfg: TrainConfig, data: Dataset, model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
         progress: Progress, val_loss: float | None) -> tuple[Path, bool]:
    """Write ckpt_{iter_num}: weights, config (model, tokenizer, training settings) and the training state.
    Returns the folder and whether val_loss is the best so far (then `best` points to it)."""
    check_finite(model, val_loss, progress.iter_num, Path(cfg.out_dir))  # a diverged model is never saved
    is_best = val_loss is not None and val_loss < progress.best_val_loss
    if is_best:
        progress.best_val_loss = val_loss
    state = train_state(optimizer, scaler, next(model.parameters()).device, iter_num=progress.iter_num,
                        best_val_loss=progress.best_val_loss, elapsed=progress.elapsed())
    extra = {"tokenizer": data.meta["tokenizer"], "train": config_to_dict(cfg), "val_loss": val_loss}
    folder = save_checkpoint(Path(cfg.out_dir), model, extra, state, iter_num=progress.iter_num, is_best=is_best)
    progress.saved_iter = progress.iter_num
    return folder, is_best


def check_finite(model: GPT, val_loss: float | None, iter_num: int, out_dir: Path) -> None:
    """Stop rather than save a model whose val loss or weights are not finite, so that `latest` (and `best`) stay on
    the last finite checkpoint. Every rank decides alike: the val loss is all-reduced and the weights are the same."""
    if val_loss is not None and not math.isfinite(val_loss):
        raise SystemExit(diverged(f"iteration {iter_num}: val loss {val_loss}, the run diverged", out_dir))
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise SystemExit(diverged(f"iteration {iter_num}: the weights are not finite, the run diverged", out_dir))


# ------------------------------------------------------------------------------------------ setup and resume


@dataclass
class Run:
    """Where this process trains, decided once by setup(): its place among torchrun's processes, device, precision."""
    ddp: bool  # under torchrun
    rank: int
    local_rank: int
    world_size: int
    local_accum: int  # micro-steps this process runs per optimizer step
    device: torch.device
    dtype: torch.dtype
    autocast: AbstractContextManager  # autocast to dtype, or nothing in float32
    compile: bool
    out_dir: Path
    resuming: bool  # init_from=resume
    writes: bool  # rank 0 of a run that trains: checkpoints, metrics.jsonl, loss.png

    @property
    def master(self) -> bool:
        return self.rank == 0  # only rank 0 prints, logs and writes files


@dataclass
class Progress:
    """The counters a checkpoint saves (and a resumed run starts from), then this process's own."""
    iter_num: int = 0
    best_val_loss: float = math.inf
    elapsed_before: float = 0.0  # seconds trained before this process started (by the run it resumes)
    t_start: float = field(default_factory=time.perf_counter)
    start_iter: int = field(init=False)  # iter_num when this process started
    saved_iter: int | None = field(default=None, init=False)  # the iteration this process last saved, if any

    def __post_init__(self) -> None:
        self.start_iter = self.iter_num

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


def setup(cfg: TrainConfig, writes: bool) -> Run:
    """Check that this run can start (processes, device, dtype, out_dir) before any work; join torchrun's group.
    writes: rank 0 of a training run, which holds out_dir's lock."""
    ddp = "RANK" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    accum = cfg.gradient_accumulation_steps
    if accum % world_size:
        raise SystemExit(f"gradient_accumulation_steps ({accum}) must be divisible by the number of processes "
                         f"({world_size}): each process runs an equal share of the micro-steps; use e.g. "
                         f"--gradient_accumulation_steps={max(world_size, accum // world_size * world_size)}")

    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        # An explicit index, as set_device and NCCL need: one GPU per process under torchrun.
        index = local_rank if ddp else device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise SystemExit("dtype=float16 needs a GPU: use --dtype=bfloat16 or --dtype=float32 on the CPU")

    out_dir, resuming = Path(cfg.out_dir), cfg.init_from == "resume"
    check_out_dir(out_dir, resuming, fresh_run_writes=writes)

    if ddp:  # from here on, main's `finally` leaves the process group
        backend = cfg.backend if cfg.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        if device.type == "cpu" and cfg.threads is None and "OMP_NUM_THREADS" not in os.environ:  # share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    enable_tf32()
    if rank == 0:
        print(format_config(cfg))
    compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    check_compiler(device, compile)
    return Run(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, local_accum=accum // world_size,
               device=device, dtype=dtype, autocast=autocast_context(device, dtype), compile=compile,
               out_dir=out_dir, resuming=resuming, writes=writes)


def build_model(cfg: TrainConfig, run: Run, data: Dataset) -> tuple[GPT, dict | None]:
    """The model on its device, in training mode: out_dir's checkpoint (resume), a new one (scratch), or a
    pretrained one (fine-tune); and the training state a resumed run continues from."""
    state = None
    if run.resuming:
        model, state = load_resumed(cfg, run, data)
        if cfg.threads is None and "OMP_NUM_THREADS" not in os.environ and state.get("threads"):
            set_threads(state["threads"])  # the run's own thread count: CPU sums, so the weights, depend on it
    elif cfg.init_from == "scratch":
        torch.manual_seed(cfg.seed)  # the same initial weights in every process and every run
        model = GPT(cfg.gpt_config(padded_vocab_size(data.tokenizer.vocab_size, char=data.tokenizer.kind == "char")))
    else:  # fine-tune: GPT-2 from the hub, a Hugging Face folder, or another run's out_dir or checkpoint
        if run.ddp and not run.master:
            dist.barrier()  # let rank 0 download a hub model into the cache first, rather than all ranks at once
        model = load_for_training(cfg.init_from, data.meta, data.dir / "meta.json", cfg.dropout, resume=False)[0]
        if run.ddp and run.master:
            dist.barrier()
        if cfg.block_size > model.config.block_size:
            raise SystemExit(f"block_size={cfg.block_size} is longer than {cfg.init_from}'s context of "
                             f"{model.config.block_size} tokens: set --block_size={model.config.block_size} or less")
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
    block_size = model.config.block_size
    data.check_fits(model.config.vocab_size, block_size)
    if run.master:
        tokens = cfg.batch_size * block_size * cfg.gradient_accumulation_steps
        print(f"{model.num_params() / 1e6:.2f}M parameters; {tokens:,} tokens per iteration ({run.world_size} "
              f"process(es) x {run.local_accum} micro-steps x {cfg.batch_size} x {block_size}); {run.device}, "
              f"{str(run.dtype).removeprefix('torch.')}{', compiled' if run.compile else ''}, "
              f"{torch.get_num_threads()} CPU thread(s)")
    return model.to(run.device).train(), state


def build_optimizer(cfg: TrainConfig, run: Run, model: GPT,
                    state: dict | None) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler, Progress]:
    """The optimizer (AdamW, or Muon with AdamW) and float16's gradient scaler, restored when resuming."""
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           run.device.type, cfg.optimizer, cfg.muon_lr, cfg.muon_momentum,
                                           cfg.muon_weight_decay)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)  # float16 underflows without it
    if state is None:
        return optimizer, scaler, Progress()
    restore_train_state(state, optimizer, scaler, run.device)
    return optimizer, scaler, Progress(state["iter_num"], state["best_val_loss"], state.get("elapsed", 0.0))


def load_resumed(cfg: TrainConfig, run: Run, data: Dataset) -> tuple[GPT, dict]:
    """The model and the training state (state.pt) of out_dir's latest checkpoint, checked against this run's
    dataset and settings; exits when it is already at max_iters."""
    model, config, state, folder = load_for_training(run.out_dir, data.meta, data.dir / "meta.json", cfg.dropout,
                                                     resume=True)
    if state["iter_num"] >= cfg.max_iters and not cfg.eval_only:
        if run.master:
            print(f"already at iteration {state['iter_num']} >= max_iters={cfg.max_iters}: nothing to train; "
                  f"raise --max_iters to continue")
        raise SystemExit(0)
    saved_optimizer = config.get("train", {}).get("optimizer", "adamw")
    if saved_optimizer != cfg.optimizer:
        raise SystemExit(f"{folder} was trained with optimizer={saved_optimizer}: resume with "
                         f"--optimizer={saved_optimizer} (its state does not carry over to {cfg.optimizer})")
    if run.master:
        print(f"resuming from iteration {state['iter_num']} ({folder}), continuing at iteration "
              f"{state['iter_num'] + 1}")
        saved = config.get("train", {})
        shape = tuple(f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "dropout"))  # as saved
        ignored = [f"{k}={getattr(cfg, k)}" for k in shape if k in saved and getattr(cfg, k) != saved[k]]
        changed = [f"{k} {v} -> {getattr(cfg, k)}" for k, v in saved.items()
                   if k not in shape + ("init_from",) and hasattr(cfg, k) and getattr(cfg, k) != v]
        if ignored:
            print(f"the model's shape comes from the checkpoint; ignoring {', '.join(ignored)}")
        if changed:
            print(f"settings changed since that checkpoint: {', '.join(changed)}")
    return model, state


if __name__ == "__main__":
    main()
