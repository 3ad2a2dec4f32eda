"""Plots of a run: expert routing with and without the constraint loss, the user embeddings in 2-D, and the
metric by history length. Routing is measured on the server's own users with the server's saved stages."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from proper_fed.data.example import Example  # noqa: E402
from proper_fed.model.backbone import Backbone  # noqa: E402
from proper_fed.model.proper_model import ProperModel  # noqa: E402
from proper_fed.model.routing import per_user_routing  # noqa: E402
from proper_fed.train.batching import collate, encode_all  # noqa: E402
from proper_fed.train.stages import serving_mode  # noqa: E402

log = logging.getLogger(__name__)


@torch.no_grad()
def routing(backbone: Backbone, folder: Path, examples: list[Example], max_length: int = 64) -> dict:
    """Per-token gates (all layers) and per-user mean routing of the group stage saved in `folder`."""
    import json

    from proper_fed.config import AdapterConfig

    meta = json.loads((folder / "group.json").read_text())
    model = ProperModel(backbone, AdapterConfig.from_dict(meta["adapters"]))
    try:
        model.load_scope("population", folder)
        model.load_scope("group", folder)
        serving_mode(model, "group")
        model.ctx.record = True
        tokens, users = [], {}
        for i in range(0, len(examples), 16):
            chunk = examples[i : i + 16]
            batch = collate(
                encode_all(backbone, chunk, max_length), backbone.tokenizer.pad_token_id, backbone.device
            )
            rows = model.user_rows([e.user_id for e in chunk])
            model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False)
            mask = batch["attention_mask"].bool()
            g = torch.stack(model.ctx.gates).float()  # (L, B, T, k)
            tokens.append(g[:, mask].reshape(-1, g.shape[-1]).cpu())  # (L * tokens, k)
            per = torch.stack(
                [per_user_routing(x.float(), batch["attention_mask"], rows) for x in model.ctx.gates]
            )
            for j, r in enumerate(rows.unique().tolist()):
                users.setdefault(r, []).append(per[:, j].mean(0))
        emb = model.lora_user_embedding.weight.detach().float().cpu()
        index = dict(model.user_index)
    finally:
        model.ctx.record = False
        model.remove()
    mean_route = {r: torch.stack(v).mean(0) for r, v in users.items()}
    return {"tokens": torch.cat(tokens).numpy(), "users": mean_route, "embeddings": emb, "index": index}


def routing_density(runs: dict[str, dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], runs.items(), strict=True):
        tokens = r["tokens"]
        for e in range(tokens.shape[1]):
            ax.hist(tokens[:, e], bins=40, range=(0, 1), histtype="step", density=True, label=f"expert {e}")
        ax.set_title(name)
        ax.set_xlabel("routing weight")
        ax.set_ylabel("density")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Expert routing weights per token (server users, all layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def user_embeddings(r: dict, path: Path, groups: dict[str, int] | None = None) -> Path:
    """User embeddings projected by PCA, colored by dominant expert; marker = latent group if known."""
    index = r["index"]
    ids = sorted(index, key=index.get)
    emb = r["embeddings"][[index[u] for u in ids]].numpy()
    centered = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    xy = centered @ vt[:2].T
    dominant = [int(r["users"][index[u]].argmax()) if index[u] in r["users"] else -1 for u in ids]
    fig, ax = plt.subplots(figsize=(5, 4))
    markers = "osD^vP*X"
    for i, u in enumerate(ids):
        g = groups.get(u, 0) if groups else 0
        ax.scatter(xy[i, 0], xy[i, 1], c=f"C{dominant[i] % 10}", marker=markers[g % len(markers)], s=40)
    ax.set_title(
        "User embeddings (PCA); color = dominant expert" + ("; marker = latent group" if groups else "")
    )
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cohort_plot(results: dict, metric: str, path: Path) -> Path:
    from simulations.report import ordered_methods

    methods = results["methods"]
    cohorts = sorted({c for m in methods.values() for c in m["cohorts"]})
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name in ordered_methods(results):
        ys = [methods[name]["cohorts"].get(c, {}).get(metric, np.nan) for c in cohorts]
        ax.plot(range(len(cohorts)), ys, marker="o", label=name)
    ax.set_xticks(range(len(cohorts)), cohorts, fontsize=7)
    ax.set_ylabel(metric)
    ax.set_xlabel("history length cohort (device users)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
