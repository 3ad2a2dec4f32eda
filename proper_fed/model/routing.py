"""What the wrapped linears share during one forward pass: which adapters are on, the batch's user
embeddings, and (in the group stage) the recorded routing weights that the constraint loss reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from proper_fed.methods import ExpertMix, as_expert_mix


@dataclass
class RoutingContext:
    """Mutable state set by `ProperModel` before each forward; read by every `ProperLinear`.

    population: add the population LoRA (ignored once merged into the base weight).
    experts: how the group experts are mixed: "none", "user_router" (stage 2: softmax(W_g [x ; e_u])),
        "lora_router" (stage 3: softmax(W_beta A_u x)) or "uniform" (ablation: 1/k each).
    user: add the user LoRA.
    user_emb: (B, d_u) user embeddings of the batch rows, needed by "user_router".
    record: keep each layer's routing weights in `gates` (for the constraint loss and the plots).
    """

    population: bool = False
    experts: ExpertMix = ExpertMix.NONE
    user: bool = False
    user_emb: torch.Tensor | None = None
    record: bool = False
    gates: list[torch.Tensor] = field(default_factory=list)

    def set_mode(self, population: bool, experts: ExpertMix | str, user: bool) -> None:
        """ConfigError for an unknown expert mix."""
        self.population, self.experts, self.user = population, as_expert_mix(experts), user


def per_user_routing(gates: torch.Tensor, mask: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
    """Mean routing vector of each distinct user in the batch.

    gates (B, T, k) token routing weights; mask (B, T) 1 on tokens that count; user_idx (B,).
    Returns (U, k), one row per distinct user, in the order of `user_idx.unique()`.
    """
    m = mask.to(gates.dtype).unsqueeze(-1)  # (B, T, 1)
    row_sum = (gates * m).sum(1)  # (B, k)
    row_cnt = m.sum(1)  # (B, 1)
    users, inverse = user_idx.unique(return_inverse=True)
    one_hot = torch.nn.functional.one_hot(inverse, len(users)).to(gates.dtype)  # (B, U)
    return (one_hot.T @ row_sum) / (one_hot.T @ row_cnt).clamp_min(1.0)  # (U, k)


def constraint_loss(
    gates_per_layer: list[torch.Tensor], mask: torch.Tensor, user_idx: torch.Tensor, unknown_idx: int = 0
) -> torch.Tensor:
    """Mean pairwise cosine similarity of different users' mean routing vectors, averaged over layers.

    Low when users route to different experts; its gradient pushes users' routing apart, which keeps the
    experts from collapsing into one. Rows of the unknown user are left out: that row stands for many users.
    """
    keep = user_idx != unknown_idx
    zero = gates_per_layer[0].new_zeros(()) if gates_per_layer else mask.new_zeros((), dtype=torch.float32)
    if keep.sum() == 0 or user_idx[keep].unique().numel() < 2:
        return zero
    total = zero
    for gates in gates_per_layer:
        v = per_user_routing(gates[keep].float(), mask[keep], user_idx[keep])  # (U, k)
        v = torch.nn.functional.normalize(v, dim=-1)
        sim = v @ v.T  # (U, U)
        n = sim.shape[0]
        total = total + (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return total / len(gates_per_layer)
