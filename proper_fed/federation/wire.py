"""The wire contract between the server and a device, written once and imported by both sides.

What travels (Flower's Message API; the server and client apps wrap these names in Flower records):

    query.base   server -> device  record BASE_PROBE   {hash, model}            "do you hold this base?"
                 device -> server  record BASE_PROBE   {has-base: 0 | 1}        (a MetricRecord)
    train.user   server -> device  BUNDLE_ARRAYS, BUNDLE_CONFIG (the signed bundle, see bundle.py),
                                   RUN {task, label-ranking?},
                                   BASE_ARRAYS, BASE_FILES, BASE_META {hash, dtypes}  only to a device
                                   that lacks the base
                 device -> server  nothing but "done" with secure aggregation (the statistics wait on the
                                   device for the secure sum); without it, METRICS (numbers only: the run's
                                   reply schema, reply_schema.py)
    train        Flower's SecAgg+ round (its four stages; secure_sum.py), run by flwr's SecAggPlusWorkflow
                 and secaggplus_mod: public keys, encrypted key shares, the masked vector, key shares.
                 Its legacy FitIns config says what the masked vector is (SECAGG_TASK): the device's
                 statistics (TASK_METRICS, the default) or, with server-data = federated, its update of a
                 federated stage's shared tensors (TASK_STAGE: FitIns parameters = the global shared
                 tensors, population layout then group layout; config STAGE, ROUND, base PROBE_HASH and
                 PROBE_MODEL; shared_vector.py)
    query.consent server -> device  nothing                                    "will you train stages 1-2?"
                 device -> server  record CONSENT     {consents: 0 | 1}       (a MetricRecord)

Tensors travel as numpy arrays plus a JSON dtype table (`encode_tensors` / `decode_tensors`): dtypes numpy
lacks (bfloat16, float8) go as same-width integer views and come back bit-exact. Tensor groups in the bundle
are named `<variant>.<scope>` (`tensor_group`). Nothing here imports Flower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch

from proper_fed.errors import BundleError


@dataclass(frozen=True)
class MessageKind:
    """One kind of message: Flower's message type is `<action>.<name>`, its ClientApp handler is registered as
    `@app.<action>(<name>)`, and the server sends it in the message group `<name>`."""

    action: str
    name: str

    @property
    def type(self) -> str:
        return f"{self.action}.{self.name}"


QUERY_BASE: Final = MessageKind("query", "base")
QUERY_CONSENT: Final = MessageKind("query", "consent")
TRAIN_USER: Final = MessageKind("train", "user")
# The type Flower's SecAgg+ workflow gives its messages (MessageType.TRAIN); ClientApp's `@app.train()`.
SECURE_SUM_TYPE: Final = "train"

# Record names inside a message's RecordDict.
BASE_PROBE: Final = "base"
BUNDLE_ARRAYS: Final = "bundle-arrays"
BUNDLE_CONFIG: Final = "bundle-config"
RUN: Final = "run"
BASE_ARRAYS: Final = "base-arrays"
BASE_FILES: Final = "base-files"
BASE_META: Final = "base-meta"
METRICS: Final = "metrics"
CONSENT: Final = "consent"

# Keys inside those records.
PROBE_HASH: Final = "hash"
PROBE_MODEL: Final = "model"
HAS_BASE: Final = "has-base"
RUN_TASK: Final = "task"
# Labels by their frequency in the server users' pooled history, most frequent first (ties: label-set
# order). Sent only for tasks with labelled history: the device's majority and user_majority baselines.
RUN_LABEL_RANKING: Final = "label-ranking"
CONSENTS: Final = "consents"
# The SecAgg+ round's FitIns config (`train` messages): what the masked vector holds.
SECAGG_TASK: Final = "proper-fed.task"
TASK_METRICS: Final = "metrics"
TASK_STAGE: Final = "stage"
STAGE: Final = "stage"
ROUND: Final = "round"
META_HASH: Final = "hash"
META_DTYPES: Final = "dtypes"

# ---- tensor groups and the bundle's per-variant adapter config ----

SHIPPED_SCOPES: Final = ("population", "group")  # the server stages a bundle carries per variant
ADAPTERS: Final = "adapters"  # adapter_config[<variant>]["adapters"]: the AdapterConfig as a dict
USER_ROWS: Final = (
    "user_rows"  # adapter_config[<variant>]["user_rows"]: rows of the user table (unknown + users)
)


def tensor_group(variant: str, scope: str) -> str:
    """The bundle's tensor group of one variant's scope: `<variant>.<scope>` (`proper.group`)."""
    if scope not in SHIPPED_SCOPES:
        raise BundleError(f"scope {scope!r} does not ship in a bundle; use one of {SHIPPED_SCOPES}")
    return f"{variant}.{scope}"


def variant_entry(adapters: Mapping[str, Any], user_rows: int) -> dict[str, Any]:
    """The manifest's `adapter_config[<variant>]`: the adapter config and the user table's row count (the
    server's user ids never ship; the device only needs the table's size, its own user is unknown to it)."""
    return {ADAPTERS: dict(adapters), USER_ROWS: int(user_rows)}


def read_variant_entry(manifest: Mapping[str, Any], variant: str) -> tuple[dict[str, Any], int]:
    """(adapter config dict, user table rows) of `variant` in a verified manifest; BundleError if absent."""
    entry = manifest.get("adapter_config", {}).get(variant)
    if not isinstance(entry, Mapping) or ADAPTERS not in entry or USER_ROWS not in entry:
        raise BundleError(f"the bundle carries no server model {variant!r}; the server did not train it")
    return dict(entry[ADAPTERS]), int(entry[USER_ROWS])


# ---- the tensor codec ----

# numpy (and therefore Flower's ArrayRecord) has no such dtypes: ship the bits as a same-width integer.
_BIT_VIEWS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _BIT_VIEWS[getattr(torch, _name)] = torch.uint8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise BundleError(f"bundle records name an unknown torch dtype {name!r}")
    return dtype


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array carrying `t`'s exact bits; dtypes numpy lacks become same-width integer views."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype in _BIT_VIEWS:
        t = t.view(_BIT_VIEWS[t.dtype])
    return t.numpy()


def tensor_from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `tensor_to_numpy`: the tensor of `dtype` whose bits `array` holds."""
    # A private, writable copy: Flower hands out read-only views of its message buffers.
    t = torch.from_numpy(np.array(array, copy=True, order="C"))
    if dtype in _BIT_VIEWS:
        if t.dtype != _BIT_VIEWS[dtype]:
            raise BundleError(
                f"a {dtype_name(dtype)} tensor must arrive as {_BIT_VIEWS[dtype]}, got {t.dtype}"
            )
        return t.view(dtype)
    if t.dtype != dtype:
        raise BundleError(f"record array has dtype {t.dtype} but the bundle says {dtype_name(dtype)}")
    return t


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], str]:
    """Tensors as (numpy arrays, the JSON dtype table that brings them back exactly)."""
    arrays = {k: tensor_to_numpy(t) for k, t in tensors.items()}
    dtypes = {k: dtype_name(t.dtype) for k, t in tensors.items()}
    return arrays, json.dumps(dtypes, sort_keys=True, separators=(",", ":"))


def decode_tensors(arrays: Mapping[str, np.ndarray], dtypes: str) -> dict[str, torch.Tensor]:
    """Inverse of `encode_tensors`; BundleError for a malformed table or one that does not fit the arrays."""
    try:
        table = json.loads(dtypes)
    except (TypeError, ValueError) as err:
        raise BundleError(f"bundle records carry malformed JSON: {err}") from err
    if not isinstance(table, dict):
        raise BundleError("bundle records carry a dtype table that is not a JSON object")
    if set(table) != set(arrays):
        raise BundleError(
            f"bundle arrays and dtype table disagree: {sorted(set(arrays) ^ set(table))[:5]} ..."
        )
    return {k: tensor_from_numpy(np.asarray(a), dtype_from_name(table[k])) for k, a in arrays.items()}
