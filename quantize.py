"""Weight-only int8 for CPU inference: every matrix of the model (the blocks' and the output head's) stored as int8
with one scale per output channel, quantized at load from the fp32 or bf16 weights. docs/benchmarks.md measures it.

    python sample.py --out_dir=out/shakespeare_char_cpu --quantize=int8

A batch-1 decode step on a CPU waits on reading every weight once: int8 reads a quarter of the bytes (issue 31).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

import model as model_module

QUANTIZE = ("none", "int8")  # the values of --quantize

# Rows (tokens) up to which a matmul goes through torch's int8 kernel: it rereads and converts the weight for every
# 4 rows, and measured here many times slower at 16 rows than at 4, where a bf16 matmul of the converted weight is not.
KERNEL_ROWS = 4
CHUNK = 2**20  # weights converted to bf16 at a time past KERNEL_ROWS: 2 MB, about a core's L2 cache


class Int8Linear(nn.Module):
    """y = x W^T + b with W (out, in) stored as int8 and `scale` (out,) per output channel: W ≈ weight * scale.

    Up to KERNEL_ROWS rows run torch's _weight_int8pack_mm (the CPU kernel gpt-fast uses), whose vectorised path
    takes bf16 only (its fp32 one is scalar, ~10x slower); more rows multiply by W converted to bf16 (exact: int8
    fits bf16's mantissa) and scale after. Both paths thus take x rounded to bf16, sum in fp32 and round the sum to
    bf16 once, so a row gets the same numbers alone or in a batch, in decoding and in eval.py; y comes back in
    x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        assert in_features % 16 == 0, "the kernel reads 16 inputs at a time: check_quantizable says so first"
        w = weight.detach().float().contiguous()  # model.Linear hands over a transposed view
        # Symmetric, [-127, 127]: the scale is rounded to bf16 first (the kernel's dtype), so that weight * scale is
        # exactly the matrix the kernel multiplies by; an all-zero row (zero_init) keeps scale 1 and weight 0.
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, 1.0).to(torch.bfloat16)
        # a Parameter (frozen) so that num_params and parameters() still see the matrix; .to(dtype) leaves int8 be
        q = w / scale.float()[:, None]  # a new tensor: w may be wte's own (a tied head), so never in place on w
        self.weight = nn.Parameter(q.round_().clamp_(-127, 127).to(torch.int8), requires_grad=False)  # (out, in)
        self.register_buffer("scale", scale)  # (out,) bf16
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # copy=True: a fresh, aligned buffer, since the kernel reads x with aligned vector loads
        x2 = x2.to(torch.bfloat16, copy=True)
        # compiled (sample.py --compile), inductor lowers the kernel's op to its own int8 GEMM at any row count, where
        # the slices' bf16 conversion of frozen weights would be constant-folded into a bf16 copy of every matrix
        if x2.size(0) <= KERNEL_ROWS or torch.compiler.is_compiling():
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale).to(x.dtype)
        else:  # a slice of W at a time, converted while it sits in the cache, rather than all of W through memory
            rows = max(1, CHUNK // self.in_features)
            y = torch.cat([F.linear(x2, w.to(torch.bfloat16)) for w in self.weight.split(rows)], dim=-1)
            y = (y.float() * self.scale.float()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 matrix this layer multiplies by."""
        return self.weight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def is_linear(module: nn.Module) -> bool:
    """Whether module multiplies by a weight matrix: the blocks' Linear and the head's nn.Linear (not an embedding)."""
    return isinstance(module, (model_module.Linear, nn.Linear))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A linear module's weight as (out, in), read from its type: nn.Linear stores it so, model.Linear as (in, out)
    (GPT-2's layout) unless it is an nn.Linear itself."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def check_quantize(quantize: str) -> None:
    """ValueError unless quantize names a scheme: the configs' __post_init__ ask here."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be {' or '.join(QUANTIZE)} (int8: weight-only, one scale per output "
                         f"channel; there is no int4 or other scheme), got {quantize!r}")


def check_quantizable(model: model_module.GPT, quantize: str, device: torch.device) -> None:
    """SystemExit with one line when `quantize` cannot run this model on this device."""
    try:
        check_quantize(quantize)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if quantize == "none":
        return
    if device.type != "cpu":
        raise SystemExit(f"--quantize=int8 runs on the CPU only (torch's int8 kernel is measured and tested there), "
                         f"not on {device.type}: pass --device=cpu, or drop --quantize and use --dtype=bfloat16")
    if model.config.n_embd % 16:
        raise SystemExit(f"--quantize=int8 needs n_embd a multiple of 16 (the kernel reads 16 inputs at a time); this "
                         f"model's is {model.config.n_embd}: drop --quantize, a model this small is fast in float32")


def quantize_model(model: model_module.GPT, quantize: str, device: torch.device) -> model_module.GPT:
    """model with every linear module replaced by an Int8Linear (in place), or model itself for "none".

    The rule is every module is_linear finds, so a new matrix in a block joins by itself. A tied head is quantized
    as a matrix while wte keeps its float weight for the embedding lookup, which stays exact."""
    check_quantizable(model, quantize, device)
    if quantize == "none":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_linear(child):
                setattr(parent, name, Int8Linear(weight_out_in(child), child.bias).to(device))
    return model

