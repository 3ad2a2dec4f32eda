"""A backbone with PROPER adapters injected into its target linears, and the user-embedding table.

The model is put in a *mode* that says which adapters are on (`set_mode`); the stages pick the mode and which
scope trains. Adapter tensors are saved and loaded per scope (population, group, user) as safetensors with a
config JSON beside them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from proper_fed.config import AdapterConfig
from proper_fed.errors import CheckpointError
from proper_fed.methods import ExpertMix
from proper_fed.model.backbone import Backbone
from proper_fed.model.proper_linear import SCOPES, ProperLinear
from proper_fed.model.routing import RoutingContext

log = logging.getLogger(__name__)

UNKNOWN_USER = 0  # row 0 of the user table: users the group stage never saw (cold start)
OWN_EMBEDDING = "own_user_embedding"  # a user's own row of the user table, in `user_state`
FORMAT_VERSION = 1


def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


class ProperModel(nn.Module):
    def __init__(self, backbone: Backbone, cfg: AdapterConfig | None = None, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.lm = backbone.model
        self.cfg = cfg or AdapterConfig()
        self.ctx = RoutingContext()
        self.gen = torch.Generator().manual_seed(seed)
        self.layers: dict[str, ProperLinear] = {}
        self._inject()
        self.lora_user_embedding = nn.Embedding(1, self.cfg.user_embedding_dim)
        nn.init.normal_(self.lora_user_embedding.weight, generator=self.gen)
        self.user_index: dict[str, int] = {}
        self._parked_rows: dict[str, int] = {}  # users routed as unknown for now (`route_own_row`)
        self.to_adapter_device()

    # ----- construction -----
    def _inject(self) -> None:
        targets = set(self.cfg.target_modules)
        found = [
            (name, m)
            for name, m in self.lm.named_modules()
            if name.rsplit(".", 1)[-1] in targets and _is_linear(m)
        ]
        if not found:
            raise CheckpointError(
                f"no linear named {sorted(targets)} in {type(self.lm).__name__}; set "
                "adapters.target_modules to names of its linears"
            )
        for name, base in found:
            parent_name, _, child = name.rpartition(".")
            wrapped = ProperLinear(base, self.cfg, self.ctx, self.gen)
            self.lm.get_submodule(parent_name).register_module(child, wrapped)
            self.layers[name] = wrapped

    def remove(self) -> None:
        """Put the original linears back, so another ProperModel (other k, other ranks) can wrap the same base."""
        for name, wrapped in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            self.lm.get_submodule(parent_name).register_module(child, wrapped.base)
        self.layers = {}

    def to_adapter_device(self) -> None:
        dev = self.backbone.device
        for layer in self.layers.values():
            for scope in SCOPES:
                for p in layer.scope_parameters(scope).values():
                    p.data = p.data.to(dev)
        self.lora_user_embedding.to(dev)

    # ----- modes and scopes -----
    def set_mode(
        self, population: bool = False, experts: ExpertMix | str = ExpertMix.NONE, user: bool = False
    ) -> None:
        self.ctx.set_mode(population, experts, user)

    def scope_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        """Every parameter of one scope, keyed by its full name (the names used on disk and on the wire)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {SCOPES}")
        params = {
            f"{name}.{p}": t
            for name, layer in self.layers.items()
            for p, t in layer.scope_parameters(scope).items()
        }
        if scope == "group":
            params["lora_user_embedding.weight"] = self.lora_user_embedding.weight
        return params

    def set_trainable(self, scopes: Iterable[str]) -> list[nn.Parameter]:
        """Exactly the parameters of `scopes` require grad; everything else (base included) is frozen."""
        scopes = set(scopes)
        self.requires_grad_(False)
        trainable = []
        for scope in SCOPES:
            for p in self.scope_parameters(scope).values():
                p.requires_grad_(scope in scopes)
                if scope in scopes:
                    trainable.append(p)
        return trainable

    def count_parameters(self, scope: str) -> int:
        return sum(p.numel() for p in self.scope_parameters(scope).values())

    # ----- users -----
    def set_users(self, user_ids: Iterable[str]) -> None:
        """Size the user table for the group stage: row 0 stays the unknown user, one row per user after it."""
        ids = sorted(set(user_ids))
        self.user_index = {u: i + 1 for i, u in enumerate(ids)}
        old = self.lora_user_embedding.weight.data
        table = torch.randn(len(ids) + 1, old.shape[1], generator=self.gen).to(old.device)
        table[UNKNOWN_USER] = old[UNKNOWN_USER]
        self.lora_user_embedding = nn.Embedding.from_pretrained(table, freeze=False)

    def add_user(self, user_id: str) -> int:
        """A new row for `user_id` at the end of the table, a copy of the unknown-user row (a device's own
        user, whose embedding it fits on its history); returns the row. A known user keeps its row."""
        if user_id in self.user_index:
            return self.user_index[user_id]
        old = self.lora_user_embedding.weight.data
        table = torch.cat([old, old[UNKNOWN_USER : UNKNOWN_USER + 1]])
        self.lora_user_embedding = nn.Embedding.from_pretrained(table.clone(), freeze=False)
        self.user_index[user_id] = table.shape[0] - 1
        return self.user_index[user_id]

    def route_own_row(self, user_id: str, own: bool) -> None:
        """Route `user_id` through its own row (`own`) or, for now, through the unknown-user row; the row
        stays in the table either way."""
        if own and user_id in self._parked_rows:
            self.user_index[user_id] = self._parked_rows.pop(user_id)
        elif not own and user_id in self.user_index:
            self._parked_rows[user_id] = self.user_index.pop(user_id)

    def user_state(self, user_id: str) -> dict[str, torch.Tensor]:
        """What serves one user after the user stage: the user scope plus, if the user has its own row, that
        row of the user table (`OWN_EMBEDDING`)."""
        state = self.scope_state_dict("user")
        if user_id in self.user_index:
            row = self.lora_user_embedding.weight[self.user_index[user_id]]
            state[OWN_EMBEDDING] = row.detach().to("cpu", copy=True)
        return state

    def load_user_state(self, user_id: str, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `user_state`: the user scope, and the user's own row when the state carries one."""
        state = dict(state)
        own = state.pop(OWN_EMBEDDING, None)
        self.load_scope_state_dict("user", state)
        if own is not None:
            row = self.add_user(user_id)
            with torch.no_grad():
                self.lora_user_embedding.weight[row] = own.to(self.lora_user_embedding.weight)

    def user_rows(self, user_ids: Iterable[str]) -> torch.Tensor:
        """Table rows of `user_ids`; users the table does not know get the unknown-user row."""
        idx = [self.user_index.get(u, UNKNOWN_USER) for u in user_ids]
        return torch.tensor(idx, dtype=torch.long, device=self.backbone.device)

    def resize_user_table(self, rows: int) -> None:
        """A user table of `rows` rows (row 0: the unknown user), to load a group stage saved with that many.
        A device loads the server's group stage this way: the server's user ids never ship, so every user is
        unknown to it and gets row 0."""
        if rows < 1:
            raise CheckpointError(f"a user table needs at least the unknown-user row; got {rows} rows")
        if self.lora_user_embedding.weight.shape[0] != rows:
            self.lora_user_embedding = nn.Embedding(rows, self.cfg.user_embedding_dim).to(
                self.backbone.device
            )

    def reset_user(self, seed: int, router_from_group: bool = False) -> None:
        """A fresh user stage in every layer (see `ProperLinear.reset_user`)."""
        gen = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            layer.reset_user(gen, router_from_group)

    def merge_population(self) -> None:
        for layer in self.layers.values():
            layer.merge_population()

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        user_rows: torch.Tensor | None = None,
        **kwargs,
    ):
        self.prepare(user_rows)
        with self.backbone.autocast():
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def prepare(self, user_rows: torch.Tensor | None) -> None:
        """Set the batch's user embeddings and clear recorded gates before a forward or a generate."""
        self.ctx.gates = []
        if self.ctx.experts.reads_user_embedding:
            if user_rows is None:
                raise ValueError(f"{self.ctx.experts} needs user_rows (use model.user_rows(ids))")
            self.ctx.user_emb = self.lora_user_embedding(user_rows)
        else:
            self.ctx.user_emb = None

    # ----- save / load per scope -----
    def scope_state_dict(self, scope: str) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.scope_parameters(scope).items()
        }

    def scope_meta(self, scope: str) -> dict:
        meta = {
            "format_version": FORMAT_VERSION,
            "scope": scope,
            "adapters": _jsonable(self.cfg.to_dict()),
            "base_model": self.backbone.name,
        }
        if scope == "group":
            meta["user_index"] = self.user_index
        return meta

    def load_scope_state_dict(
        self, scope: str, state: dict[str, torch.Tensor], meta: dict | None = None
    ) -> None:
        if scope == "group" and meta is not None and "user_index" in meta:
            self.user_index = dict(meta["user_index"])
            self.resize_user_table(len(self.user_index) + 1)
        params = self.scope_parameters(scope)
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"{scope} adapter does not fit this model: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; was it saved with the same model and adapter config?"
            )
        with torch.no_grad():
            for name, p in params.items():
                t = state[name]
                if t.shape != p.shape:
                    raise CheckpointError(
                        f"{scope} tensor {name} has shape {tuple(t.shape)}, this model expects "
                        f"{tuple(p.shape)}: ranks or num_experts differ from the saved config"
                    )
                p.copy_(t.to(p.device, p.dtype))

    def save_scope(self, scope: str, folder: str | Path) -> Path:
        """Write `<scope>.safetensors` and `<scope>.json` into `folder` atomically."""
        from safetensors.torch import save

        from proper_fed.atomic import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{scope}.safetensors", save(self.scope_state_dict(scope)))
        atomic_write_bytes(folder / f"{scope}.json", json.dumps(self.scope_meta(scope), indent=2).encode())
        return folder / f"{scope}.safetensors"

    def load_scope(self, scope: str, folder: str | Path) -> dict:
        from safetensors.torch import load_file

        folder = Path(folder)
        path, meta_path = folder / f"{scope}.safetensors", folder / f"{scope}.json"
        if not path.exists() or not meta_path.exists():
            raise CheckpointError(
                f"no saved {scope} adapter in {folder} (expected {path.name} and {meta_path.name})"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{meta_path} has format_version {meta.get('format_version')}, this proper-fed "
                f"reads {FORMAT_VERSION}"
            )
        saved = AdapterConfig.from_dict(meta["adapters"])
        if saved != self.cfg:
            raise CheckpointError(f"{path} was saved with adapter config {saved}, this model has {self.cfg}")
        self.load_scope_state_dict(scope, load_file(str(path)), meta)
        return meta


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
