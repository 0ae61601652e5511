"""LRACS: the RACS direction of the full gradient, lifted horizontally onto the LoRA factors.

Paper: "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", Jinyang Zheng and
Tong Wu, ICLR 2026, https://openreview.net/forum?id=Guo2XGgxZA (RACS: Gong et al. 2025,
https://arxiv.org/abs/2502.07752). Reference code (Gitee, sanjin998/lora_s) was not reachable:
reconstructed from the paper's description.

Per pair, with ``G = dL/dW`` (m x n, read from the optimizer's ``FullGradients``)::

    q <- EMA_beta(row mean of G^2)  (m),     c <- EMA_beta(column mean of G^2)  (n)
    G~ = diag(q^ + eps)^-1/2 G diag(c^ + eps)^-1/2      (q^, c^ bias-corrected like Adam's v)
    eta = gamma / max(||G~|| / phi, gamma)   (eta = 1 while phi = 0, i.e. at step 1)
    phi <- eta ||G~||
    Xd = -alpha eta G~;   (Bd, Ad) = lift(B, A, Xd);   B += lr Bd;   A += lr Ad

State m + n + 1 per pair. No weight decay: the Sylvester matrix K replaces it. The bias correction
of q, c is our choice (the description only says "EMA"); without it the first steps are up to
1/(1 - beta) times larger.
"""

from __future__ import annotations

from typing import Any

import torch

from mixofshow.optim.base import HyperParameterError, LoRAOptimizer, check_beta, check_lr, check_no_weight_decay, check_positive
from mixofshow.optim.batching import compute_dtype
from mixofshow.optim.bucketed import (
    apply_,
    next_steps,
    per_pair,
    state_tensor,
)
from mixofshow.optim.lift import horizontal_lift, horizontal_lift_reference, lift_products
from mixofshow.optim.registry import OptimizerSpec

__all__ = ["LRACS", "racs_direction", "lracs_update", "lracs_reference", "SPECS"]


def racs_direction(
    g: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    phi: torch.Tensor,
    bc: float | torch.Tensor,
    *,
    beta: float,
    alpha: float,
    gamma: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched RACS direction ``Xd`` (k, m, n) with the new ``(row, col, phi)``; pure function.

    ``bc = 1 - beta^t`` (a float, or a (k, 1, 1) tensor when steps differ).
    """
    g2 = g.square()
    row = torch.lerp(row, g2.mean(-1), 1.0 - beta)
    col = torch.lerp(col, g2.mean(-2), 1.0 - beta)
    bc2 = bc if isinstance(bc, float) else bc[..., 0]
    inv_r = (row / bc2 + eps).rsqrt()
    inv_c = (col / bc2 + eps).rsqrt()
    g_t = g * inv_r[..., :, None] * inv_c[..., None, :]
    norm = torch.linalg.vector_norm(g_t, dim=(-2, -1))
    # norm-growth limiter; phi = 0 marks "no previous step" (a torch.where, no host sync)
    ratio = norm / phi.clamp_min(torch.finfo(phi.dtype).tiny)
    eta = torch.where(phi > 0, gamma / torch.clamp(ratio, min=gamma), torch.ones_like(norm))
    xd = g_t * (-alpha * eta)[..., None, None]
    return xd, row, col, eta * norm


def lracs_update(
    a_list, b_list, g_list, row, col, phi, steps, *, lr, beta, alpha, gamma, eps, damping
) -> None:
    """One LRACS step for a shape bucket; updates the state lists and factors in place."""
    dt = compute_dtype(a_list[0].dtype)
    a, b = torch.stack(a_list).to(dt), torch.stack(b_list).to(dt)
    g = torch.stack(g_list).to(dt)
    bc = per_pair([1.0 - beta**t for t in steps], g, 3)
    xd, new_row, new_col, new_phi = racs_direction(
        g, torch.stack(row), torch.stack(col), torch.stack(phi)[:, 0], bc,
        beta=beta, alpha=alpha, gamma=gamma, eps=eps,
    )  # fmt: skip
    del g
    torch._foreach_copy_(row, list(new_row.unbind(0)))
    torch._foreach_copy_(col, list(new_col.unbind(0)))
    torch._foreach_copy_(phi, list(new_phi[:, None].unbind(0)))
    xa, bx = lift_products(b, a, xd)
    del xd
    bd, ad = horizontal_lift(b, a, xa, bx, damping=damping)
    apply_(b_list, bd, lr)
    apply_(a_list, ad, lr)


def lracs_reference(a, b, g, state, *, lr, beta, alpha, gamma, eps, damping):
    """Plain one-pair LRACS step (explicit G~, Kronecker Sylvester); returns new ``(A, B)``."""
    t = state["t"] = state.get("t", 0) + 1
    m, n = g.shape
    q = state["q"] = beta * state.get("q", torch.zeros(m, dtype=g.dtype)) + (1 - beta) * (g * g).mean(1)
    c = state["c"] = beta * state.get("c", torch.zeros(n, dtype=g.dtype)) + (1 - beta) * (g * g).mean(0)
    bc = 1 - beta**t
    g_t = torch.diag((q / bc + eps) ** -0.5) @ g @ torch.diag((c / bc + eps) ** -0.5)
    norm = float(torch.linalg.norm(g_t))
    phi = state.get("phi", 0.0)
    eta = 1.0 if phi == 0.0 else gamma / max(norm / phi, gamma)
    state["phi"] = eta * norm
    bd, ad, _ = horizontal_lift_reference(b, a, -alpha * eta * g_t, damping)
    return a + lr * ad, b + lr * bd


class LRACS(LoRAOptimizer):
    """LRACS (LoRA-S): RACS row/column-scaled full-gradient direction, lifted to the factors.

    Args:
        groups: ``[{"pairs": [(A, B), ...], "lr": ...}, ...]``; each layer must record its full
            gradient (``needs_full_grad``).
        lr: learning rate.
        beta: EMA factor of the row/column statistics.
        alpha: RACS step scale.
        gamma: norm-growth limit per step (>= 1).
        eps: added to the row/column statistics before the square root.
        damping: relative damping of the r x r Grams in the lift.
        weight_decay: must be 0; the Sylvester matrix K replaces weight decay.
    """

    needs_full_grad = True

    def __init__(
        self,
        groups,
        lr: float = 1e-4,
        beta: float = 0.9,
        alpha: float = 0.05,
        gamma: float = 1.01,
        eps: float = 1e-8,
        damping: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        check_beta("beta", beta)
        check_positive("alpha", alpha, allow_zero=False)
        check_positive("gamma", gamma)
        if not gamma >= 1.0:
            raise HyperParameterError("gamma", f"Invalid gamma: {gamma} (expected >= 1)")
        check_positive("eps", eps)
        check_positive("damping", damping)
        check_no_weight_decay(weight_decay)
        defaults = {"lr": lr, "beta": beta, "alpha": alpha, "gamma": gamma, "eps": eps, "damping": damping}
        super().__init__(groups, defaults)

    def _step_bucket(self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, ...]]) -> None:
        a_list = [a for a, _ in pairs]
        b_list = [b for _, b in pairs]
        states = [self.state[a] for a in a_list]
        a0, b0 = pairs[0]
        m, n = b0.shape[0], a0.shape[1]
        sdt, dev = compute_dtype(a0.dtype), a0.device
        grads = [self.full_grad(a, (m, n)) for a in a_list]
        row = [state_tensor(s, "row", (m,), sdt, dev) for s in states]
        col = [state_tensor(s, "col", (n,), sdt, dev) for s in states]
        phi = [state_tensor(s, "phi", (1,), sdt, dev) for s in states]
        steps = next_steps(states)
        hp = {k: group[k] for k in ("lr", "beta", "alpha", "gamma", "eps", "damping")}
        lracs_update(a_list, b_list, grads, row, col, phi, steps, **hp)


SPECS = [
    OptimizerSpec(
        name="lracs",
        cls=LRACS,
        paper="Zheng & Wu, ICLR 2026 (LoRA-S, LRACS)",
        memory="m + n + 1 (row/column scales and the limiter norm)",
        reconstructed=True,
        recommended_lr={"unet": 2e-3, "text_encoder": 2e-4},
    ),
]
