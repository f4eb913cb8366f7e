"""The first step of scripts/gpu_check.sh: does the device do bf16, flash attention forward and backward, and
torch.compile in default and reduce-overhead (CUDA graph) mode? Appends one JSON line of what it found.

    python scripts/gpu_smoke.py --device=cuda --out=gpu_check_out/figures.jsonl
    python scripts/gpu_smoke.py --device=cpu    # the same checks on a CPU (gpu_check.sh --dry-run)
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from config import parse_config  # noqa: E402
from sample import cuda_graphs_recorded  # noqa: E402


@dataclass
class SmokeConfig:
    device: str = "cuda"  # cuda, cuda:N, or cpu for a rehearsal
    out: str | None = None  # append the JSON line here too


def check_flash(device: torch.device) -> float:
    """Causal flash attention in bf16, forward and backward, against fp32 math attention: the largest difference."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, generator=gen).to(device) for _ in range(3))  # (B, n_head, T, head_dim)
    half = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises when the flash kernel cannot run these inputs
        y = F.scaled_dot_product_attention(*half, is_causal=True)
        y.float().square().sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in half), "flash backward: no finite grads"
    err = (y.float() - ref).abs().max().item()
    assert err < 0.05, f"flash attention differs from fp32 math attention by {err}"
    return err


def check_compile(device: torch.device) -> dict:
    """One tiny function compiled in each mode, against eager; whether reduce-overhead recorded a CUDA graph."""
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ w).sum(-1)

    x, w = torch.randn(8, 64, device=device), torch.randn(64, 64, device=device)
    found = {}
    for mode in ("default", "reduce-overhead"):
        t0, graphs = time.perf_counter(), cuda_graphs_recorded(device)
        compiled = torch.compile(f, mode=mode, dynamic=False)
        for _ in range(3):  # reduce-overhead: a warm-up call, a recording, a replay
            out = compiled(x, w).clone()
        torch.testing.assert_close(out, f(x, w), rtol=1e-3, atol=1e-3)
        found[f"compile_{mode}_s"] = round(time.perf_counter() - t0, 2)
        if mode == "reduce-overhead":
            after = cuda_graphs_recorded(device)
            found["cuda_graphs"] = None if None in (graphs, after) else after > graphs
    if device.type == "cuda" and not found["cuda_graphs"]:  # a finding for the later steps, not a reason to stop
        print(f"warning: reduce-overhead recorded no CUDA graph that sample.cuda_graphs_recorded can see "
              f"({found['cuda_graphs']}); TORCH_LOGS=perf_hints says why", flush=True)
    return found


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(SmokeConfig, argv, description=__doc__)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or use --device=cpu for a rehearsal")
    t0 = time.perf_counter()
    row = {"what": "smoke", "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": datetime.date.today().isoformat()}
    if device.type == "cuda":
        row |= {"device_name": torch.cuda.get_device_name(device),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                "bf16": torch.cuda.is_bf16_supported()}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        row["triton"] = None
    print(json.dumps(row), flush=True)
    a = torch.randn(256, 256, device=device)
    err = ((a.bfloat16() @ a.bfloat16()).float() - a @ a).abs().max().item()
    assert err < 2.0, f"a bf16 matmul differs from fp32 by {err}"  # bf16 keeps ~3 digits of entries ~16 in size
    row["flash_max_err"] = round(check_flash(device), 5)
    print("flash attention: forward and backward ran, max difference", row["flash_max_err"], flush=True)
    row |= check_compile(device)
    row["smoke_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(row), flush=True)
    if cfg.out:
        with open(cfg.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
