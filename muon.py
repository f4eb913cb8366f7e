"""Muon for the hidden weight matrices and AdamW for the rest, as one torch optimizer (one step, one state_dict).

    optimizer = model.configure_optimizers(0.0, 3e-3, (0.8, 0.95), "cpu", optimizer="muon", muon_lr=0.02)

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon) replaces each matrix's Nesterov-momentum update by its
nearest semi-orthogonal matrix, approximated by five Newton–Schulz steps. Written here rather than taken from
torch.optim.Muon for three reasons measured or argued in docs/recipe.md: Q, K and V are orthogonalised as separate
blocks of the fused c_attn (modded-nanogpt found that better); the shape factor reads our (in, out) storage the right
way round; and same-shape blocks are orthogonalised together as one batched matmul (fewer, larger kernels).
Under DDP the gradients are already averaged, so every rank computes the same update (no extra communication).
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steep at 0, converging to ~[0.7, 1.2]


def orthogonalize(G: torch.Tensor, steps: int = 5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U Vᵀ of each matrix in G (n, rows, cols), by Newton–Schulz iteration on the wide orientation;
    in G's dtype, or out_dtype."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(torch.bfloat16 if _fast_bf16(G.device) else torch.float32)  # as precise as the iteration needs
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A²: fused, fewer temporaries than the expression
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return (X.mT if tall else X).to(out_dtype or G.dtype)


def _fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls run at least twice as fast as fp32: CUDA, and CPUs with AVX-512 BF16 or AMX (oneDNN's check)."""
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Muon(torch.optim.Optimizer):
    """Param groups with muon=True hold same-shape 2-D weights stored (in, out); `blocks` splits their columns into
    matrices orthogonalised separately (c_attn: q, k, v). Groups with muon=False are updated by AdamW."""

    def __init__(self, params: list[dict], lr: float = 0.02, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                        ns_steps=ns_steps, muon=False, blocks=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and len({p.shape for p in group["params"]}) != 1:
                raise ValueError("a Muon group must hold weights of one shape (they are orthogonalised as a batch)")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        assert closure is None, "Muon takes no closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, mu = group["lr"], group["momentum"]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mu)  # buf = mu * buf + (1 - mu) * g
        updates = torch._foreach_lerp(grads, bufs, mu)  # Nesterov: (1 - mu) * g + mu * buf
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        n_in = params[0].size(0)
        widths = group["blocks"] or [params[0].size(1)]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        for width in sorted(set(widths)):
            cols = [slice(s, s + w) for s, w in zip(starts, widths) if w == width]
            blocks = torch.stack([u[:, c] for u in updates for c in cols])  # (n * len(cols), in, width)
            ortho = orthogonalize(blocks, group["ns_steps"], out_dtype=torch.bfloat16 if _fast_bf16(blocks.device)
                                  else None)  # added to fp32 weights as it is: no copy back to fp32
            # Jordan's sqrt(max(1, fan_out / fan_in)): equal RMS per output unit whatever the aspect ratio
            alpha = -lr * math.sqrt(max(1.0, width / n_in))
            for o, (p, c) in zip(ortho, [(p, c) for p in params for c in cols]):
                p[:, c].add_(o, alpha=alpha)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(eps)
            p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))
