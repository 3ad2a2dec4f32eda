"""One frozen base linear wrapped by composition with PROPER's three adapters.

    h = W x                                          base (nn.Linear or bitsandbytes Linear4bit), frozen
      + s_p B_p A_p x                                stage 1, population LoRA (merged away when possible)
      + sum_i g_i s_g B_i A_i x                      stage 2/3, k expert LoRAs, all k in one batched matmul
      + s_u B_u A_u x                                stage 3, user LoRA

with g = softmax(W_x x + W_e e_u) in stage 2 (user-aware router) and g = softmax(W_beta A_u x) in stage 3
(LoRA-aware router), or g = softmax(W_x x + W_e e_u + W_beta A_u x) (the LoRA-aware router started at the
user's stage-2 routing: W_beta = 0 at the start). Every B starts at zero, so the wrapped layer equals the base
at init.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from proper_fed.config import AdapterConfig
from proper_fed.methods import ExpertMix
from proper_fed.model.routing import RoutingContext

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

    def reset_user(self, gen: torch.Generator, router_from_group: bool = False) -> None:
        """A fresh user LoRA (B = 0) and LoRA-aware router: random as in the paper, or zero when it is added to
        the frozen stage-2 routing (`router_from_group`), so the layer is back to the user's group model."""
        with torch.no_grad():
            dev = self.lora_user_A.device
            self.lora_user_A.copy_(_kaiming(tuple(self.lora_user_A.shape), self.in_features, gen).to(dev))
            self.lora_user_B.zero_()
            beta = _kaiming(tuple(self.lora_beta.shape), self.r_u, gen).to(dev)  # drawn either way: same A_u
            self.lora_beta.copy_(beta.zero_() if router_from_group else beta)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.ctx
        pop = ctx.population and not self.merged
        experts, user = ctx.experts != ExpertMix.NONE, ctx.user
        need_xu = user or ctx.experts.has_lora_router
        if not (pop or experts or need_xu):
            return out
        k, r = self.k, self.r_g
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_pop_A.dtype)  # adapters compute in their own (full) precision
        # Every A the mode needs in one matmul, every B in another: x is cast and read once, the adapters' sum
        # is one output. A rows and B columns line up: [population (r_p); experts (k*r_g); user (r_u)], then
        # the user-aware router's W_x (k), which has no B. The scalings go onto the (small) B weights.
        a, b = [], []
        if pop:
            a.append(self.lora_pop_A)  # (r_p, in)
            b.append(self.s_p * self.lora_pop_B)  # (out, r_p)
        if experts:
            a.append(self.lora_expert_A.reshape(k * r, -1))  # (k*r, in)
            b.append((self.s_g * self.lora_expert_B).permute(1, 0, 2).reshape(self.out_features, k * r))
        if need_xu:
            a.append(self.lora_user_A)  # (r_u, in)
            if user:
                b.append(self.s_u * self.lora_user_B)  # (out, r_u)
        if ctx.experts.reads_user_embedding:
            a.append(self.lora_router_x)  # (k, in)
        h = F.linear(x, torch.cat(a) if len(a) > 1 else a[0])  # (..., sum of rows)
        n_b = sum(w.shape[1] for w in b)
        coef = h[..., :n_b]  # (..., n_b): the columns that meet a B
        if experts:
            start = self.r_p if pop else 0
            logits = h.new_zeros((*h.shape[:-1], k))  # uniform unless a router below adds to it
            if ctx.experts.reads_user_embedding:
                assert ctx.user_emb is not None, f"{ctx.experts} needs ctx.user_emb"
                e = F.linear(ctx.user_emb.to(self.lora_router_e.dtype), self.lora_router_e)  # (B, k)
                logits = h[..., -k:] + e.view(e.shape[0], *([1] * (h.dim() - 2)), -1)
            if ctx.experts.has_lora_router:
                xu = h[..., start + k * r : start + k * r + self.r_u]  # (..., r_u)
                logits = logits + F.linear(xu, self.lora_beta)  # (..., k)
            gates = logits.float().softmax(-1)  # (..., k)
            if ctx.record:
                ctx.gates.append(gates)
            g = gates.to(h.dtype).unsqueeze(-1).expand(*gates.shape, r).flatten(-2)  # (..., k*r)
            g = F.pad(g, (start, n_b - start - k * r), value=1.0)  # (..., n_b): 1 on the other adapters
            coef = coef * g
        delta = F.linear(coef, torch.cat(b, 1) if len(b) > 1 else b[0])  # (..., out)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_p={self.r_p}, k={self.k}, r_g={self.r_g}, "
            f"r_u={self.r_u}, merged={self.merged}"
        )
