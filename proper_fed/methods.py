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
    (stage 2: softmax(W_x x + W_e e_u)), by the LoRA-aware router (stage 3 as in the paper:
    softmax(W_beta A_u x)), or by the LoRA-aware router started at the user's stage-2 routing
    (softmax(W_x x + W_e e_u + W_beta A_u x) with W_x, e_u frozen and W_beta = 0 at the start, so the user
    stage starts exactly at the user's stage-2 model)."""

    NONE = "none"
    UNIFORM = "uniform"
    USER_ROUTER = "user_router"
    LORA_ROUTER = "lora_router"
    LORA_ROUTER_FROM_GROUP = "lora_router_from_group"

    @property
    def reads_user_embedding(self) -> bool:
        """The mix needs the batch's user embeddings (and the stage-2 router W_x)."""
        return self in (ExpertMix.USER_ROUTER, ExpertMix.LORA_ROUTER_FROM_GROUP)

    @property
    def has_lora_router(self) -> bool:
        """The mix has a trainable LoRA-aware router W_beta over the user LoRA's A_u x."""
        return self in (ExpertMix.LORA_ROUTER, ExpertMix.LORA_ROUTER_FROM_GROUP)


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


MATCHED = "matched"  # the capacity- and budget-matched server model of population_matched and oppu_matched


@dataclass(frozen=True)
class ServerChange:
    """What a server model changes in PROPER's server stages (None / False: unchanged).

    population_only: no group stage; the population LoRA gets PROPER's whole server rank
    (population_rank + num_experts * group_rank) and both stages' epochs: the same server data, budget
    (examples x epochs) and trainable capacity as stages 1 + 2, without groups or routing."""

    num_experts: int | None = None
    constraint_weight: float | None = None
    end_to_end: bool = False
    population_only: bool = False


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
    on: the server model (bundle entry) a device method runs on: PROPER's, or MATCHED.
    personal_embedding: the device fits its user's own row of the user table before serving or training
        (`stages.fit_user_embedding`); False: the user is routed through the unknown-user row.
    """

    name: str
    kind: Kind
    trains: Trains
    serves: Stage | None
    user_mix: ExpertMix | None
    describe: str
    server: ServerChange | None = None
    on: str = PROPER
    personal_embedding: bool = False

    @property
    def trains_user_stage(self) -> bool:
        """The device trains a user LoRA (and keeps a checkpoint) for this method."""
        return self.user_mix is not None

    @property
    def server_model(self) -> str:
        """Which server model (bundle variant) the device loads for it: a variant's own, else `on`."""
        return self.name if self.kind is Kind.VARIANT else self.on

    @property
    def uses_llm(self) -> bool:
        return self.kind is not Kind.LABEL_BASELINE


def _variant(name: str, describe: str, change: ServerChange) -> Method:
    mix = ExpertMix.LORA_ROUTER_FROM_GROUP
    return Method(
        name, Kind.VARIANT, Trains.SERVER, Stage.USER, mix, describe, change, personal_embedding=True
    )


def _proper_user(name: str, mix: ExpertMix, describe: str, personal_embedding: bool = True) -> Method:
    """PROPER's user stage (or an ablation of it) on PROPER's server model."""
    return Method(
        name, Kind.DEVICE, Trains.DEVICE, Stage.USER, mix, describe, personal_embedding=personal_embedding
    )


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
        "population_matched",
        Kind.DEVICE,
        Trains.NOTHING,
        Stage.POPULATION,
        None,
        "one LoRA with PROPER's server rank and budget (stages 1 + 2), no groups",
        on=MATCHED,
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
        "oppu_matched",
        Kind.DEVICE,
        Trains.DEVICE,
        Stage.USER,
        ExpertMix.NONE,
        "population_matched + a per-user LoRA (OPPU with PROPER's server capacity and budget)",
        on=MATCHED,
    ),
    Method(
        "proper_group",
        Kind.DEVICE,
        Trains.DEVICE,
        Stage.GROUP,
        None,
        "stages 1-2, the device user's own embedding fitted on the device",
        personal_embedding=True,
    ),
    Method(
        "proper_group_unknown",
        Kind.DEVICE,
        Trains.NOTHING,
        Stage.GROUP,
        None,
        "stages 1-2, the device user routed through the unknown-user row (ablation)",
    ),
    _proper_user(
        "proper_uniform_experts",
        ExpertMix.UNIFORM,
        "user LoRA over uniformly mixed experts (ablation: capacity without routing)",
        personal_embedding=False,
    ),
    _proper_user(
        "proper_no_lora_router",
        ExpertMix.USER_ROUTER,
        "user LoRA over the user's frozen stage-2 routing (ablation: no LoRA-aware router)",
    ),
    _proper_user(
        "proper_no_router_init",
        ExpertMix.LORA_ROUTER,
        "the paper's LoRA-aware router from a random init (ablation)",
    ),
    _proper_user(
        "proper_no_embedding_fit",
        ExpertMix.LORA_ROUTER_FROM_GROUP,
        "PROPER with the user routed through the unknown-user row (ablation)",
        personal_embedding=False,
    ),
    _proper_user(
        PROPER,
        ExpertMix.LORA_ROUTER_FROM_GROUP,
        "PROPER: all three stages, the user stage started at the user's stage-2 model",
    ),
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
# Server models that are not variants (device methods run on them): name -> its change to PROPER's stages.
SERVER_MODELS: Mapping[str, ServerChange] = MappingProxyType(
    {PROPER: ServerChange(), MATCHED: ServerChange(population_only=True)}
)


def server_change(name: str) -> ServerChange:
    """The change to PROPER's server stages of server model or variant `name`."""
    if name in SERVER_MODELS:
        return SERVER_MODELS[name]
    return method(name).server or ServerChange()


def server_models_for(
    methods: tuple[str, ...] | list[str], variants: tuple[str, ...] | list[str]
) -> tuple[str, ...]:
    """The server models a run trains: PROPER's first (the others reuse its population stage where they can),
    those the device methods run on, then the variants."""
    needed = [PROPER, *(METHODS[m].on for m in methods), *variants]
    return tuple(dict.fromkeys(needed))


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
