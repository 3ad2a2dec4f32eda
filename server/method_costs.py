"""What each reported method costs, side by side: trainable parameters and training tokens on the server and
on the device, and the bytes of server adapters a device needs for it. The matched baselines exist to hold
these equal, so the table that compares methods shows them."""

from __future__ import annotations

from collections.abc import Mapping

from proper_fed.methods import METHODS, PROPER, ExpertMix, Method, Stage
from server.server_stages import ServerModel


def server_stages_of(spec: Method) -> tuple[str, ...]:
    """The server stages a method's answers stand on."""
    if spec.serves in (None, Stage.BASE):
        return ()
    if spec.serves is Stage.POPULATION or spec.user_mix is ExpertMix.NONE:
        return ("population",)
    return ("population", "group")


def _stage_metric(models: Mapping[str, ServerModel], model: str, stage: str, stat: str) -> float | None:
    """A stage's metric; a server model that reused PROPER's population stage reports it under PROPER. None
    when no stage recorded it (federated stages: the server never learns how many tokens a device trained)."""
    for name in (model, PROPER):
        value = models[name].metrics.get(f"{stage}.{stat}") if name in models else None
        if value is not None:
            return float(value)
    return None


def _total(values: list[float | None]) -> float | None:
    return None if None in values else sum(values)  # type: ignore[arg-type]


def _nbytes(tensors: Mapping) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def method_costs(reported: Mapping[str, dict], models: Mapping[str, ServerModel]) -> dict[str, dict]:
    """Per reported LLM method (any scoring protocol: `proper@rank` costs what `proper` does): server
    trainable parameters and training tokens, device trainable parameters and training tokens per user,
    and the bytes of server adapters shipped for it."""
    out = {}
    for name, row in reported.items():
        spec = METHODS.get(name.partition("@")[0])
        if spec is None or not spec.uses_llm or spec.server_model not in models:
            continue
        model, stages = spec.server_model, server_stages_of(spec)
        server_model = models[model]
        joint = "end_to_end.tokens" in server_model.metrics  # stages 1-2 trained as one
        metric_stages = ("end_to_end",) if joint and stages else stages
        out[name] = {
            "server_trainable_parameters": _total(
                [_stage_metric(models, model, s, "trainable_parameters") for s in metric_stages]
            ),
            "server_training_tokens": _total(
                [_stage_metric(models, model, s, "tokens") for s in metric_stages]
            ),
            "device_trainable_parameters": row.get("trainable_parameters_per_user", 0),
            "device_training_tokens_per_user": row.get("train_tokens_per_user", 0.0),
            "shipped_adapter_bytes": sum(_nbytes(getattr(server_model, s)) for s in stages),
        }
    return out
