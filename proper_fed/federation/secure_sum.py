"""A device's metric statistics as one fixed-length vector of small integers that Flower's SecAgg+ sums
exactly, so the server learns the sums over the devices and nothing about any one of them.

The layout is public: `devices` (every device sends 1), then the run's reply-schema keys in the schema's
order (`reply_schema.py`, derived from the run config and the task's label set). Each key becomes one
64-bit word in offset binary (`value / resolution`, rounded, plus 2^63) split into four 16-bit limbs, so a
device's vector is `4 * len(keys)` integers in [0, 2^16) whatever its data.

Precision and range (per device, refused with an error outside them):
- counts (`n`, `tp.3`, `history_len`, ...): exact integers (resolution 1);
- sums of per-query scores (`abs_err`, `sq_err`, `rouge1`, `rougeL`): resolution 1e-6;
- seconds: resolution 1e-3 (one millisecond);
- with differential privacy (`dp.py`) the counts carry noise too and get resolution 1e-3;
- the schema's bounds come first (`ReplySchema.violation`); the word itself holds |value| < 2^62
  resolutions, which only noise could reach.

Through SecAgg+ (flwr 1.41, `SecAggPlusWorkflow` and `secaggplus_mod`): the workflow clips every float to
[-c, c] and quantizes it to Q levels, then sums modulo M. A limb x travels as `x * 2c / Q - c`, which
quantizes to exactly x (c and Q powers of two: no rounding anywhere, and its stochastic rounding never
fires); with `num_examples = max_weight = 1` the workflow returns the mean of the floats, from which
`limb_sums_from_mean` recovers each limb's exact integer sum. Every limb sum stays below M as long as
fewer than M / Q = 65,536 devices are summed. Nothing here imports Flower.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from proper_fed.errors import ConfigError, PrivacyError
from proper_fed.federation.dp import DpPlan, dp_plan
from proper_fed.federation.reply_schema import COST_KEYS

if TYPE_CHECKING:
    from proper_fed.federation.reply_schema import KeyRule, ReplySchema

DEVICES_KEY: Final = "devices"
DEVICE_SECONDS: Final = "device_total_s"
LIMB_BITS: Final = 16
LIMBS: Final = 4  # one 64-bit word per key
OFFSET: Final = 1 << 63  # offset binary: a signed value v travels as v + OFFSET
MAX_MAGNITUDE: Final = (1 << 62) - 1  # |v| in resolutions; leaves room for the noise of DP

COUNT_RESOLUTION: Final = 1.0
SUM_RESOLUTION: Final = 1e-6
SECONDS_RESOLUTION: Final = 1e-3
NOISY_COUNT_RESOLUTION: Final = 1e-3

# SecAggPlusWorkflow's quantization: powers of two, so a limb maps to a float and back bit-exactly.
CLIPPING_RANGE: Final = 1.0
QUANTIZATION_RANGE: Final = 1 << LIMB_BITS
MODULUS_RANGE: Final = 1 << 32
STEP: Final = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
MAX_DEVICES: Final = MODULUS_RANGE // QUANTIZATION_RANGE - 1  # the workflow also sums Q once per device
MAX_WEIGHT: Final = 1.0  # every device's FitRes says num_examples = 1: the workflow's weight is exactly 1


def resolution(rule: KeyRule, noisy: bool = False) -> float:
    """The fixed-point step of one schema key: counts exact, sums of scores 1e-6, seconds 1e-3."""
    if rule.integer:
        return NOISY_COUNT_RESOLUTION if noisy else COUNT_RESOLUTION
    return SUM_RESOLUTION if rule.n_key else SECONDS_RESOLUTION


@dataclass(frozen=True)
class SumLayout:
    """The public order of a run's summed keys and each key's fixed-point step."""

    keys: tuple[str, ...]
    resolutions: tuple[float, ...]
    noisy: bool = False

    @property
    def length(self) -> int:
        """Integers in a device's vector."""
        return LIMBS * len(self.keys)

    def describe(self) -> dict:
        """The layout's public facts, for results.json."""
        return {
            "keys": len(self.keys),
            "integers_per_device": self.length,
            "limb_bits": LIMB_BITS,
            "resolution": {
                "counts": NOISY_COUNT_RESOLUTION if self.noisy else COUNT_RESOLUTION,
                "score_sums": SUM_RESOLUTION,
                "seconds": SECONDS_RESOLUTION,
            },
            "max_devices": MAX_DEVICES,
        }


def sum_layout(
    schema: ReplySchema, *, noisy: bool = False, exclude: frozenset[str] = frozenset()
) -> SumLayout:
    """The layout of a run: `devices`, then every schema key not in `exclude`, in the schema's order.
    `noisy`: the counts carry DP noise (resolution 1e-3 instead of exact)."""
    keys = [k for k in schema.rules if k not in exclude]
    if DEVICES_KEY in keys:
        raise ConfigError(f"the reply schema may not hold the key {DEVICES_KEY!r}: the layout uses it")
    return SumLayout(
        (DEVICES_KEY, *keys),
        (COUNT_RESOLUTION, *(resolution(schema.rules[k], noisy) for k in keys)),
        noisy,
    )


def encode(
    numbers: Mapping[str, float],
    schema: ReplySchema,
    layout: SumLayout,
    noise: Mapping[str, float] | None = None,
) -> np.ndarray:
    """One device's statistics as its vector of limbs (int64, each in [0, 2^16)). The statistics must pass the
    run's schema (PrivacyError otherwise: the reason names at most a schema key, never a value); a key the
    device did not report counts 0; `noise` (DP, in the keys' own units) is added before rounding."""
    why = schema.violation(numbers)
    if why is not None:
        raise PrivacyError(f"the statistics break the run's reply schema: {why}")
    words = []
    for key, step in zip(layout.keys, layout.resolutions, strict=True):
        value = 1.0 if key == DEVICES_KEY else float(numbers.get(key, 0.0))
        value += (noise or {}).get(key, 0.0)
        v = round(value / step)
        if abs(v) > MAX_MAGNITUDE:
            raise ConfigError(
                f"{key}: {value!r} is outside the fixed-point range +-{MAX_MAGNITUDE * step:.3g} "
                f"(resolution {step:g}); lower the DP noise or check the statistic"
            )
        words.append(v + OFFSET)
    mask = (1 << LIMB_BITS) - 1
    limbs = [(w >> (LIMB_BITS * j)) & mask for w in words for j in range(LIMBS)]
    return np.asarray(limbs, dtype=np.int64)


def to_secagg(limbs: np.ndarray) -> np.ndarray:
    """The floats a device hands to SecAgg+ (FitRes parameters): limb x as x * STEP - CLIPPING_RANGE, which
    the workflow's quantizer maps back to exactly x."""
    limbs = np.asarray(limbs, dtype=np.int64)
    if limbs.ndim != 1 or limbs.size == 0 or limbs.min() < 0 or limbs.max() >= QUANTIZATION_RANGE:
        raise PrivacyError("a secure-sum vector must be a non-empty row of limbs in [0, 2^16)")
    return limbs.astype(np.float64) * STEP - CLIPPING_RANGE


def limb_sums_from_mean(mean: np.ndarray, devices: int) -> np.ndarray:
    """Each limb's exact integer sum over `devices` vectors, from the mean SecAgg+ returns (its dequantized
    sum divided by the number of devices; the float error is far below 1/2)."""
    if not 1 <= devices <= MAX_DEVICES:
        raise ConfigError(f"{devices} devices: a secure sum covers 1 to {MAX_DEVICES} devices")
    exact = (np.asarray(mean, dtype=np.float64) + CLIPPING_RANGE) * devices / STEP
    sums = np.rint(exact)
    if np.abs(exact - sums).max(initial=0.0) > 1e-3 or sums.min(initial=0) < 0:
        raise ConfigError("the secure sum is not a sum of limbs: the SecAgg+ parameters do not match")
    if sums.max(initial=0) > devices * (QUANTIZATION_RANGE - 1):
        raise ConfigError("the secure sum is not a sum of limbs: the SecAgg+ parameters do not match")
    return sums.astype(np.int64)


def decode(limb_sums: np.ndarray, layout: SumLayout, devices: int) -> dict[str, float]:
    """The summed statistics, by key, from each limb's integer sum over `devices` vectors. ConfigError when
    the vector does not fit the layout or its `devices` sum is not `devices`."""
    limb_sums = np.asarray(limb_sums, dtype=np.int64)
    if limb_sums.shape != (layout.length,):
        raise ConfigError(f"a secure sum of {limb_sums.size} integers; this run's layout has {layout.length}")
    out: dict[str, float] = {}
    for i, (key, step) in enumerate(zip(layout.keys, layout.resolutions, strict=True)):
        parts = limb_sums[LIMBS * i : LIMBS * (i + 1)]
        total = sum(int(p) << (LIMB_BITS * j) for j, p in enumerate(parts)) - devices * OFFSET
        out[key] = float(total) if step == 1.0 else total * step
    if out[DEVICES_KEY] != devices:
        raise ConfigError(f"the secure sum counts {out[DEVICES_KEY]:g} devices, not {devices}")
    return out


@dataclass(frozen=True)
class SumPlan:
    """What a run sums: its reply schema, the vector layout, the fewest devices a sum may cover, and the DP
    noise (None without DP). The same on every device and on the server: all of it is public."""

    schema: ReplySchema
    layout: SumLayout
    min_devices: int
    dp: DpPlan | None = None

    def device_vector(
        self, numbers: Mapping[str, float], rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """One device's vector: its statistics checked against the schema, within the DP bounds and with its
        share of the noise when the run has DP."""
        why = self.schema.violation(numbers)
        if why is not None:
            raise PrivacyError(f"the statistics break the run's reply schema: {why}")
        if self.dp is None:
            return encode(numbers, self.schema, self.layout)
        noise = self.dp.noise(rng if rng is not None else np.random.default_rng(secrets.randbits(128)))
        return encode(self.dp.clip(numbers), self.schema, self.layout, noise)

    def sums(self, limb_sums: np.ndarray, devices: int) -> dict[str, float]:
        return decode(limb_sums, self.layout, devices)

    def describe(self, devices: int) -> dict:
        """The public facts of a sum over `devices` devices, for results.json."""
        return {
            "min_devices": self.min_devices,
            "devices_summed": devices,
            "layout": self.layout.describe(),
            "dp": None if self.dp is None else self.dp.accounting(devices),
        }


def cost_keys(schema: ReplySchema) -> frozenset[str]:
    """The schema's cost keys (seconds, parameters, tokens): not sent under DP."""
    return frozenset(k for k in schema.rules if k == DEVICE_SECONDS or k.rpartition(".")[2] in COST_KEYS)


def sum_plan(schema: ReplySchema, settings: Any) -> SumPlan:
    """The sum plan of a run from its settings (`RunSettings`: min_devices and the dp_* fields)."""
    if settings.dp_epsilon <= 0:
        return SumPlan(schema, sum_layout(schema), settings.min_devices)
    layout = sum_layout(schema, noisy=True, exclude=cost_keys(schema))
    plan = dp_plan(
        schema,
        layout.keys[1:],
        epsilon=settings.dp_epsilon,
        delta=settings.dp_delta,
        max_queries=settings.dp_max_queries,
        max_history=settings.dp_max_history,
        min_devices=settings.min_devices,
    )
    return SumPlan(schema, layout, settings.min_devices, plan)
