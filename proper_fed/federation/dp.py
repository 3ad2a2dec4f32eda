"""Optional differential privacy on the secure sums: Gaussian noise with a stated (epsilon, delta) per run.

What is protected: the sums the server decodes (`secure_sum.py`). Adjacent federations differ in one
device's data (its history and its queries); which devices take part is known to the server anyway (SecAgg+
tells it who sent a vector), so `devices` and nothing else is left without noise. Each run releases its
sums once: a device's vector is summed once and then deleted from the device's state.

Bounds (run config): one device scores at most `dp-max-queries` queries (`Q`) and holds at most
`dp-max-history` history items (`H`). Every summed key gets a unit, the most one device can add to it:

    counts of queries (n, parsed, correct, tp/fp/fn.<i>, queries)   Q
    sums of per-query scores (abs_err, sq_err, rouge1, rougeL)      Q * the score's maximum
    history_len                                                     H

Costs (seconds, trainable parameters, training tokens) are not sent under DP: each would need a bound of its
own and would add noise to every metric. In units, a device's vector z has z_k in [0, 1]; per method and
protocol the per-label counts obey sum_i (tp_i + fn_i) <= n and sum_i fp_i <= n, so grouping them (`tp+fn`,
`fp`), every group sums to at most 1 and ||z||^2 <= G, the number of groups. The device enforces exactly this
(clamps each key to its unit, scales a group down if its sum exceeds 1: a no-op for a device within the
bounds). Replacing one device's data changes the sum by at most sqrt(2 G) in L2 (for vectors >= 0,
||z - z'||^2 <= ||z||^2 + ||z'||^2).

Noise: the Gaussian mechanism with sigma from the analytic calibration of Balle & Wang ("Improving the
Gaussian Mechanism for Differential Privacy", ICML 2018, Theorem 8), exact for every epsilon. It is spread over
the devices: each adds N(0, sigma^2 / t) per key (in units), t = min-devices, the fewest devices a sum may
cover, so a sum over m >= t devices carries noise of standard deviation sigma * sqrt(m / t) >= sigma.
Caveats, stated in results.json: devices must follow the protocol (a device colluding with the server can
subtract its own share); each device rounds its noisy value to the fixed-point grid (1e-3 for counts, 1e-6
for score sums) before it is summed, which the accounting treats as continuous; numpy's PCG64 seeded from
the OS draws the noise (not a cryptographic sampler).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from proper_fed.errors import ConfigError

if TYPE_CHECKING:
    from proper_fed.federation.reply_schema import ReplySchema

MAX_EPSILON: Final = 20.0  # e^epsilon still fits the calibration's arithmetic
HISTORY_KEY: Final = "history_len"
_LABEL_GROUPS: Final = {"tp": "tp+fn", "fn": "tp+fn", "fp": "fp"}


def _phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The smallest delta for which adding N(0, sigma^2) to a query of L2 sensitivity `sensitivity` is
    (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8)."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest sigma that makes the Gaussian mechanism (epsilon, delta)-DP (bisection on
    `gaussian_delta`, which decreases in sigma), to a relative 1e-12."""
    if not 0 < epsilon <= MAX_EPSILON or not 0 < delta < 1 or sensitivity <= 0:
        raise ConfigError(
            f"dp-epsilon={epsilon!r}, dp-delta={delta!r}: use 0 < epsilon <= {MAX_EPSILON:g} and 0 < delta < 1"
        )
    lo, hi = 0.0, sensitivity
    while gaussian_delta(hi, epsilon, sensitivity) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if gaussian_delta(mid, epsilon, sensitivity) <= delta else (mid, hi)
    return hi


@dataclass(frozen=True)
class DpPlan:
    """A run's noise: each key's unit and group, the L2 sensitivity (in units) and sigma."""

    epsilon: float
    delta: float
    max_queries: int
    max_history: int
    min_devices: int
    units: Mapping[str, float]
    groups: Mapping[str, str]
    sensitivity: float
    sigma: float

    @property
    def device_sigma(self) -> float:
        """Each device's share of the noise, in units."""
        return self.sigma / math.sqrt(self.min_devices)

    def clip(self, numbers: Mapping[str, float]) -> dict[str, float]:
        """The statistics within the bounds: each key clamped to [0, unit], each group scaled down to a sum
        of at most one unit (unchanged for a device within the bounds). Keys without a unit are dropped."""
        z = {k: min(max(float(numbers.get(k, 0.0)) / u, 0.0), 1.0) for k, u in self.units.items()}
        totals: dict[str, float] = {}
        for k, v in z.items():
            totals[self.groups[k]] = totals.get(self.groups[k], 0.0) + v
        return {k: self.units[k] * v / max(1.0, totals[self.groups[k]]) for k, v in z.items()}

    def noise(self, rng: np.random.Generator) -> dict[str, float]:
        """One device's noise share, in each key's own units."""
        draws = rng.normal(0.0, self.device_sigma, size=len(self.units))
        return {k: u * float(d) for (k, u), d in zip(self.units.items(), draws, strict=True)}

    def noise_std(self, devices: int) -> dict[str, float]:
        """The standard deviation of the noise in a sum over `devices` devices, per statistic (the part of a
        key after its method; per-label counts as `tp/fp/fn`)."""
        scale = self.sigma * math.sqrt(devices / self.min_devices)
        return {_stat_name(k): u * scale for k, u in self.units.items()}

    def accounting(self, devices: int) -> dict[str, Any]:
        """What results.json and the report state about the noise of a sum over `devices` devices."""
        return {
            "mechanism": "Gaussian, analytic calibration (Balle & Wang 2018), shared out over the devices",
            "epsilon": self.epsilon,
            "delta": self.delta,
            "adjacency": "federations that differ in one device's data; who takes part is known to the server",
            "releases": 1,
            "bounds": {"max_queries": self.max_queries, "max_history": self.max_history},
            "groups": len(set(self.groups.values())),
            "l2_sensitivity_units": self.sensitivity,
            "sigma_units": self.sigma,
            "devices_assumed": self.min_devices,
            "device_sigma_units": self.device_sigma,
            "devices_summed": devices,
            "noise_std": self.noise_std(devices),
            "not_covered": "costs (seconds, parameters, tokens) are not sent under DP; `devices` is exact",
            "caveats": (
                "devices must follow the protocol and not collude with the server; each device rounds its "
                "noisy value to the fixed-point grid, treated as continuous; noise from numpy PCG64 seeded "
                "by the OS"
            ),
        }


def _stat_name(key: str) -> str:
    if "." not in key:
        return key
    stat = key.split(".", 1)[1]
    return "tp/fp/fn" if stat.split(".")[0] in _LABEL_GROUPS and "." in stat else stat


def _unit_and_group(key: str, schema: ReplySchema, max_queries: int, max_history: int) -> tuple[float, str]:
    rule = schema.rules[key]
    if key == HISTORY_KEY:
        return float(max_history), key
    if not rule.integer and rule.n_key:  # a sum of per-query scores
        return max_queries * rule.per_query, key
    if rule.integer and (rule.n_key or key == "queries"):  # a count of queries
        prefix, _, stat = key.partition(".")
        kind = stat.split(".")[0]
        if kind in _LABEL_GROUPS and stat.count(".") == 1:
            return float(max_queries), f"{prefix}.{_LABEL_GROUPS[kind]}"
        return float(max_queries), key
    raise ConfigError(f"{key}: no DP bound for this statistic; it cannot be sent under dp-epsilon > 0")


def dp_plan(
    schema: ReplySchema,
    keys: Sequence[str],
    *,
    epsilon: float,
    delta: float,
    max_queries: int,
    max_history: int,
    min_devices: int,
) -> DpPlan:
    """The noise of a run whose devices send `keys` (schema keys, costs excluded)."""
    if max_queries < 1 or max_history < 1:
        raise ConfigError(
            f"dp-max-queries={max_queries}, dp-max-history={max_history}: both must be at least 1"
        )
    units, groups = {}, {}
    for key in keys:
        units[key], groups[key] = _unit_and_group(key, schema, max_queries, max_history)
    sensitivity = math.sqrt(2 * len(set(groups.values())))
    return DpPlan(
        epsilon,
        delta,
        max_queries,
        max_history,
        min_devices,
        units,
        groups,
        sensitivity,
        gaussian_sigma(epsilon, delta, sensitivity),
    )
