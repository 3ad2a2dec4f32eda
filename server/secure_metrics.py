"""The server's side of the secure sum (`proper_fed.federation.secure_sum`): Flower's SecAgg+ workflow over
the devices that finished the user stage. The server learns each key's sum over at least min-devices
devices, and which devices are in it; it never holds a device's vector unmasked.

Flower 1.41 runs SecAgg+ only through its legacy path: `SecAggPlusWorkflow` on a `LegacyContext` whose
strategy picks the devices (`configure_fit`) and receives the unmasked aggregate (`aggregate_fit`). The
workflow is called directly, for one round, instead of through `DefaultWorkflow`: no parameter
initialisation and no evaluation round, which would send the devices messages of their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from proper_fed.errors import ConfigError
from proper_fed.federation import secure_sum
from proper_fed.federation.secure_sum import SumPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureSums:
    """What the server learned: each key's sum, and the devices whose vectors are in it."""

    sums: dict[str, float]
    nodes: tuple[int, ...]


@dataclass(frozen=True)
class SecureRelease:
    """The secure-sum phase of a run: its public plan, the devices that were ready, and the sums (None when
    fewer than min-devices devices completed SecAgg+: then nothing was released)."""

    plan: SumPlan
    sums: SecureSums | None
    ready: list[int]


class _SumOf(Strategy):
    """The legacy strategy SecAggPlusWorkflow needs: it selects exactly `nodes`, sends each the same `fitins`
    (none for the metrics; the global shared tensors and the stage for a federated round) and keeps the
    aggregate."""

    def __init__(self, grid: Grid, nodes: list[int], fitins: FitIns | None = None) -> None:
        self.grid, self.nodes = grid, nodes
        self.fitins = fitins or FitIns(Parameters(tensors=[], tensor_type=""), {})
        self.mean: np.ndarray | None = None
        self.summed: tuple[int, ...] = ()

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), self.fitins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        # Every result carries the same unmasked aggregate: the mean of the devices' floats.
        if results:
            self.summed = tuple(sorted(proxy.node_id for proxy, _ in results))
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


def check_enough_devices(nodes: list[int], min_devices: int) -> None:
    """Refuse to send anything when fewer devices are connected than a secure sum may cover."""
    if len(nodes) < min_devices:
        raise ConfigError(
            f"only {len(nodes)} device(s) connected, but secure aggregation sums over at least "
            f"min-devices={min_devices}: nothing was sent. Start more devices, wait longer (node-wait-s), "
            "lower min-devices, or set secure-aggregation = false"
        )


def secure_sums(
    grid: Grid, context: Context, nodes: list[int], plan: SumPlan, timeout_s: float
) -> SecureSums | None:
    """Run SecAgg+ over `nodes` (devices holding a vector of `plan`'s layout); the decoded sums, or None when
    fewer than min-devices devices completed the protocol (the workflow then unmasks nothing)."""
    summed = secure_limb_sums(grid, context, nodes, plan.min_devices, timeout_s)
    if summed is None:
        return None
    limb_sums, devices = summed
    return SecureSums(plan.sums(limb_sums, len(devices)), devices)


def secure_limb_sums(
    grid: Grid,
    context: Context,
    nodes: list[int],
    min_devices: int,
    timeout_s: float,
    fitins: FitIns | None = None,
) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """One SecAgg+ round over `nodes`, each sent `fitins`: the exact integer sum of each limb of the devices'
    vectors, and the devices in it; None when fewer than `min_devices` completed the protocol (the workflow
    then unmasks nothing). The one place that drives SecAggPlusWorkflow, with the layout's fixed setup."""
    if len(nodes) < min_devices:
        log.error("only %d devices are ready; a secure sum covers at least %d", len(nodes), min_devices)
        return None
    strategy = _SumOf(grid, sorted(nodes), fitins)
    legacy = LegacyContext(context, ServerConfig(num_rounds=1), strategy=strategy)
    legacy.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    legacy.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every device shares its keys with every other
        reconstruction_threshold=min_devices,
        max_weight=secure_sum.MAX_WEIGHT,
        clipping_range=secure_sum.CLIPPING_RANGE,
        quantization_range=secure_sum.QUANTIZATION_RANGE,
        modulus_range=secure_sum.MODULUS_RANGE,
        timeout=timeout_s,
    )
    workflow(grid, legacy)
    if strategy.mean is None or len(strategy.summed) < min_devices:
        return None
    return secure_sum.limb_sums_from_mean(strategy.mean, len(strategy.summed)), strategy.summed
