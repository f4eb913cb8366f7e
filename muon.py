"""Muon for the hidden weight matrices and AdamW for the rest, as one torch optimizer (one step, one state_dict).

    optimizer = model.configure_optimizers(0.0, 3e-3, (0.8, 0.95), "cpu", optimizer="muon", muon_lr=0.02)

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon) replaces each matrix's Nesterov-momentum update by its
nearest semi-orthogonal matrix, approximated by five Newton–Schulz steps. The matrices are torch.optim.Muon's: we
measured our own (q, k and v orthogonalised as separate blocks of c_attn, the shape factor read the other way round
for our (in, out) storage) side by side with it, and it was no better (docs/recipe.md). Under DDP the gradients are
already averaged, so every rank computes the same update (no extra communication).
"""

from __future__ import annotations

import math

import torch


class Muon(torch.optim.Optimizer):
    """Param groups with muon=True (2-D weights) are stepped by torch.optim.Muon, the others by AdamW; the two share
    this optimizer's param_groups and state, so that schedules, state_dict and GradScaler see one optimizer."""

    def __init__(self, params: list[dict], lr: float = 0.02, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                                      muon=False))
        self._matrices = torch.optim.Muon([{"params": [torch.zeros(1, 1)]}], lr=lr)  # its groups are linked below
        self._link()

    def _link(self) -> None:
        """torch.optim.Muon steps our muon groups (the same dicts, with its defaults added) and keeps its momentum
        buffers in our state."""
        groups = [g for g in self.param_groups if g["muon"]]
        for group in groups:
            for key, value in self._matrices.defaults.items():
                group.setdefault(key, value)
            group["nesterov"], group["adjust_lr_fn"] = True, "original"
        self._matrices.param_groups, self._matrices.state = groups, self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state: link them again
        self._link()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        assert closure is None, "Muon takes no closure"
        self._matrices.step()
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw(group, [p for p in group["params"] if p.grad is not None])

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
