"""The method registry: every method a run can report, where it trains, what it needs, how it is reported.

One frozen table (`METHODS`, in report order) is the single source for the run settings' validation, the
device's methods, the server variants, the reply schema and the report. Adding a method is one entry here
(plus, for a server variant, the config change it makes in `ServerChange`).

Kinds of method:
- device methods (run config `methods`): served by PROPER's server model; some train a user stage on the
  device (`user_mix` is not None), the others only evaluate a frozen stage;
- server variants (run config `variants`): an ablation that changes the server stages (`server`); the device
  trains PROPER's user stage on top of that variant's group model;
- label baselines: no LLM, the device answers every query with a label (majority, user_majority).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar

from proper_fed.errors import ConfigError


class Stage(StrEnum):
    """The stage a model serves after: base (no adapter), population, group or user."""

    BASE = "base"
    POPULATION = "population"
    GROUP = "group"
    USER = "user"


class ExpertMix(StrEnum):
    """How the group experts are mixed: not at all (OPPU), 1/k each (ablation), by the user-aware router
    (stage 2: softmax(W_g [x ; e_u])), or by the LoRA-aware router (stage 3: softmax(W_beta A_u x))."""

    NONE = "none"
    UNIFORM = "uniform"
    USER_ROUTER = "user_router"
    LORA_ROUTER = "lora_router"


class Trains(StrEnum):
    """Where a method's own training happens."""

    NOTHING = "nothing"
    SERVER = "server"
    DEVICE = "device"


class Kind(StrEnum):
    """Where a method is requested: run config `methods`, run config `variants`, or always (label baselines)."""

    DEVICE = "device"
    VARIANT = "variant"
    LABEL_BASELINE = "label_baseline"


PROPER = "proper"  # the server model every device method runs on
E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True)
class ServerChange:
    """What a server variant changes in PROPER's server stages (None / False: unchanged)."""

    num_experts: int | None = None
    constraint_weight: float | None = None
    end_to_end: bool = False


@dataclass(frozen=True)
class Method:
    """One reported method.

    name: the reported name (results.json, report.md, reply keys).
    kind: how a run asks for it (see `Kind`).
    trains: where its own training happens (a variant's device stage is PROPER's and not counted here).
    serves: the stage its answers come from.
    user_mix: the device user stage's expert mix; None when the device trains nothing for it.
    server: the server-side change of a variant; None for every other kind.
    describe: one line for the report ("" = not described).
    """

    name: str
    kind: Kind
    trains: Trains
    serves: Stage | None
    user_mix: ExpertMix | None
    describe: str
    server: ServerChange | None = None

    @property
    def trains_user_stage(self) -> bool:
        """The device trains a user LoRA (and keeps a checkpoint) for this method."""
        return self.user_mix is not None

    @property
    def server_model(self) -> str:
        """Which server model (bundle variant) the device loads for it: the variant's own, else PROPER's."""
        return self.name if self.kind is Kind.VARIANT else PROPER

    @property
    def uses_llm(self) -> bool:
        return self.kind is not Kind.LABEL_BASELINE


def _variant(name: str, describe: str, change: ServerChange) -> Method:
    return Method(name, Kind.VARIANT, Trains.SERVER, Stage.USER, ExpertMix.LORA_ROUTER, describe, change)


_TABLE = (
    Method(
        "majority",
        Kind.LABEL_BASELINE,
        Trains.NOTHING,
        None,
        None,
        "most frequent label of the server's pooled data (no LLM)",
    ),
    Method(
        "user_majority",
        Kind.LABEL_BASELINE,
        Trains.NOTHING,
        None,
        None,
        "the user's own most frequent label (no LLM)",
    ),
    Method("zero_shot", Kind.DEVICE, Trains.NOTHING, Stage.BASE, None, "the backbone alone"),
    Method(
        "population",
        Kind.DEVICE,
        Trains.NOTHING,
        Stage.POPULATION,
        None,
        "stage 1: one LoRA on all server users",
    ),
    Method(
        "oppu",
        Kind.DEVICE,
        Trains.DEVICE,
        Stage.USER,
        ExpertMix.NONE,
        "population + a per-user LoRA, no groups (OPPU)",
    ),
    Method(
        "proper_group",
        Kind.DEVICE,
        Trains.NOTHING,
        Stage.GROUP,
        None,
        "stages 1-2, device users through the unknown-user embedding",
    ),
    Method(
        "proper_no_lora_router",
        Kind.DEVICE,
        Trains.DEVICE,
        Stage.USER,
        ExpertMix.UNIFORM,
        "user LoRA over uniformly mixed experts (ablation)",
    ),
    Method(PROPER, Kind.DEVICE, Trains.DEVICE, Stage.USER, ExpertMix.LORA_ROUTER, "PROPER: all three stages"),
    _variant(
        "proper_end_to_end",
        "stage 1-2 modules trained jointly, then stage 3 (ablation)",
        ServerChange(end_to_end=True),
    ),
    _variant(
        "proper_no_constraint",
        "PROPER with lambda = 0 (ablation)",
        ServerChange(constraint_weight=0.0),
    ),
    _variant("proper_k2", "PROPER with k = 2 experts (ablation)", ServerChange(num_experts=2)),
    _variant("proper_k5", "PROPER with k = 5 experts (ablation)", ServerChange(num_experts=5)),
    _variant("proper_k8", "PROPER with k = 8 experts (ablation)", ServerChange(num_experts=8)),
)

# name -> method, in report order
METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _TABLE})
REPORT_ORDER: tuple[str, ...] = tuple(METHODS)
DEVICE_METHODS: tuple[str, ...] = tuple(m.name for m in _TABLE if m.kind is Kind.DEVICE)
VARIANTS: tuple[str, ...] = tuple(m.name for m in _TABLE if m.kind is Kind.VARIANT)
LABEL_BASELINES: tuple[str, ...] = tuple(m.name for m in _TABLE if m.kind is Kind.LABEL_BASELINE)


def method(name: str) -> Method:
    """The registry entry of `name`; ConfigError naming the known methods otherwise."""
    found = METHODS.get(name)
    if found is None:
        raise ConfigError(f"unknown method {name!r}; use one of {list(METHODS)}")
    return found


def unknown_names(names: tuple[str, ...] | list[str], kind: Kind) -> list[str]:
    """The names in `names` that are not methods of `kind` (for validating run config lists)."""
    return [n for n in names if n not in METHODS or METHODS[n].kind is not kind]


def _member(kind: type[E], value: str, name: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}; use one of {[m.value for m in kind]}") from None


def as_expert_mix(value: str) -> ExpertMix:
    """`value` as an ExpertMix; ConfigError naming the choices otherwise."""
    return _member(ExpertMix, value, "expert_mix")


def as_stage(value: str) -> Stage:
    """`value` as a Stage; ConfigError naming the choices otherwise."""
    return _member(Stage, value, "stage")
