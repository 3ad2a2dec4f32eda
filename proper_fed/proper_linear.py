"""One frozen base linear wrapped by composition with PROPER's three adapters.

    h = W x                                          base (nn.Linear or bitsandbytes Linear4bit), frozen
      + s_p B_p A_p x                                stage 1, population LoRA (merged away when possible)
      + sum_i g_i s_g B_i A_i x                      stage 2/3, k expert LoRAs, all k in one batched matmul
      + s_u B_u A_u x                                stage 3, user LoRA

with g = softmax(W_x x + W_e e_u) in stage 2 (user-aware router) and g = softmax(W_beta A_u x) in stage 3
(LoRA-aware router). Every B starts at zero, so the wrapped layer equals the base at init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from proper_fed.config import AdapterConfig
from proper_fed.routing import RoutingContext

SCOPES = ("population", "group", "user")
# Which parameters belong to which scope: the single source for freezing, saving and the wire.
SCOPE_PARAMS = {
    "population": ("lora_pop_A", "lora_pop_B"),
    "group": ("lora_expert_A", "lora_expert_B", "lora_router_x", "lora_router_e"),
    "user": ("lora_user_A", "lora_user_B", "lora_beta"),
}


def _kaiming(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # Same bound as nn.Linear's default init (kaiming_uniform with a=sqrt(5)), as in loralib.
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class ProperLinear(nn.Module):
    def __init__(self, base: nn.Module, cfg: AdapterConfig, ctx: RoutingContext, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.k, self.r_p, self.r_g, self.r_u = (
            cfg.num_experts,
            cfg.population_rank,
            cfg.group_rank,
            cfg.user_rank,
        )
        self.s_p, self.s_g, self.s_u = cfg.alpha / self.r_p, cfg.alpha / self.r_g, cfg.alpha / self.r_u
        object.__setattr__(self, "ctx", ctx)  # shared plain object, not a submodule
        self.merged = False
        d_in, d_out, k = self.in_features, self.out_features, self.k
        self.lora_pop_A = nn.Parameter(_kaiming((self.r_p, d_in), d_in, gen))
        self.lora_pop_B = nn.Parameter(torch.zeros(d_out, self.r_p))
        self.lora_expert_A = nn.Parameter(_kaiming((k, self.r_g, d_in), d_in, gen))  # (k, r, in)
        self.lora_expert_B = nn.Parameter(torch.zeros(k, d_out, self.r_g))  # (k, out, r)
        self.lora_router_x = nn.Parameter(_kaiming((k, d_in), d_in, gen) * 0.1)
        self.lora_router_e = nn.Parameter(_kaiming((k, cfg.user_embedding_dim), cfg.user_embedding_dim, gen))
        self.lora_user_A = nn.Parameter(_kaiming((self.r_u, d_in), d_in, gen))
        self.lora_user_B = nn.Parameter(torch.zeros(d_out, self.r_u))
        self.lora_beta = nn.Parameter(_kaiming((k, self.r_u), self.r_u, gen))

    def scope_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in SCOPE_PARAMS[scope]}

    def reset_user(self, gen: torch.Generator) -> None:
        """A fresh user LoRA and LoRA-aware router (B = 0: the layer is back to the group model)."""
        with torch.no_grad():
            dev = self.lora_user_A.device
            self.lora_user_A.copy_(_kaiming(tuple(self.lora_user_A.shape), self.in_features, gen).to(dev))
            self.lora_user_B.zero_()
            self.lora_beta.copy_(_kaiming(tuple(self.lora_beta.shape), self.r_u, gen).to(dev))

    @torch.no_grad()
    def merge_population(self) -> None:
        """W <- W + s_p B_p A_p, exact in the base's precision. Only for full-precision nn.Linear bases:
        merging into 4-bit weights is lossy, so there the population LoRA stays a frozen adapter."""
        if self.merged:
            return
        if type(self.base) is not nn.Linear:
            raise TypeError(f"cannot merge into {type(self.base).__name__}; keep the adapter unmerged")
        w = self.base.weight
        delta = self.s_p * (self.lora_pop_B.double() @ self.lora_pop_A.double())  # (out, in)
        w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
        self.merged = True

    def _mix_experts(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        # The experts' term on its own: x (..., in), gates (..., k) -> (..., out), all k experts in one matmul.
        # `forward` computes the same term fused with the other adapters' matmuls.
        k, r = self.k, self.r_g
        xa = x @ self.lora_expert_A.reshape(k * r, -1).T  # (..., k*r)
        xa = (xa.unflatten(-1, (k, r)) * gates.unsqueeze(-1)).flatten(-2)  # (..., k*r)
        b = self.lora_expert_B.permute(0, 2, 1).reshape(k * r, -1)  # (k*r, out)
        return self.s_g * (xa @ b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.ctx
        pop = ctx.population and not self.merged
        experts, user = ctx.experts != "none", ctx.user
        need_xu = user or ctx.experts == "lora_router"
        if not (pop or experts or need_xu):
            return out
        k, r, dtype = self.k, self.r_g, self.lora_pop_A.dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)  # adapters compute in their own (full) precision; under autocast the matmul casts
        # Every A the mode needs in one matmul (one cast and one read of x instead of one per adapter):
        # rows [A_p (r_p); A_u (r_u); A_1..A_k (k*r_g); W_x (k)].
        parts = [
            (self.lora_pop_A, pop),
            (self.lora_user_A, need_xu),
            (self.lora_expert_A.reshape(k * r, -1), experts),
            (self.lora_router_x, ctx.experts == "user_router"),
        ]
        a = [w for w, on in parts if on]
        h = (x @ (torch.cat(a) if len(a) > 1 else a[0]).T).to(dtype)  # (..., sum of ranks)
        pieces = iter(h.split([w.shape[0] for w in a], -1))
        xp, xu = next(pieces) if pop else None, next(pieces) if need_xu else None
        # Each adapter's scaled coefficients (small, (..., rank)) and its B, summed by one matmul at the end.
        coef, b = [], []
        if pop:
            coef.append(self.s_p * xp)
            b.append(self.lora_pop_B)  # (out, r_p)
        if experts:
            xa = next(pieces)  # (..., k*r)
            if ctx.experts == "user_router":
                assert ctx.user_emb is not None, "user_router needs ctx.user_emb"
                e = ctx.user_emb.to(dtype) @ self.lora_router_e.T  # (B, k)
                logits = next(pieces) + e.view(e.shape[0], *([1] * (h.dim() - 2)), -1)
            elif ctx.experts == "lora_router":
                logits = xu @ self.lora_beta.T  # (..., k)
            else:  # uniform
                logits = h.new_zeros((*h.shape[:-1], k))
            gates = logits.float().softmax(-1)
            if ctx.record:
                ctx.gates.append(gates)
            gated = (xa.unflatten(-1, (k, r)) * gates.to(dtype).unsqueeze(-1)).flatten(-2)  # (..., k*r)
            coef.append(self.s_g * gated)
            b.append(self.lora_expert_B.permute(1, 0, 2).reshape(self.out_features, k * r))  # (out, k*r)
        if user:
            coef.append(self.s_u * xu)
            b.append(self.lora_user_B)  # (out, r_u)
        delta = torch.cat(coef, -1) @ torch.cat(b, 1).T if len(coef) > 1 else coef[0] @ b[0].T  # (..., out)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_p={self.r_p}, k={self.k}, r_g={self.r_g}, "
            f"r_u={self.r_u}, merged={self.merged}"
        )
