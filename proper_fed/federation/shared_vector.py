"""A device's update of a federated stage's shared tensors as one fixed-length vector of 16-bit limbs that
Flower's SecAgg+ sums exactly, and FedAvg from the decoded sum. Nothing here imports Flower.

What a device sends (the layout is public: the stage's shared tensor names and shapes, derived from the run
config, sorted by name): `devices` (always 1), its FedAvg `weight`, then `weight * delta` for every value of
every shared tensor in layout order, where `delta = local - global` is its local update. The server learns
only the sums over the devices, from which FedAvg is `global + sum(weight * delta) / sum(weight)`.

FedAvg is weighted by examples: a device's weight is the number of training examples it trained on, capped at
`MAX_EXAMPLES` (so one device with a huge history cannot outweigh the rest beyond that; the cap is public).

Precision and range (stated, checked on the device before anything is encoded):
- every value of `delta` is clipped to [-VALUE_RANGE, VALUE_RANGE] (clipping is explicit: the count of clipped
  values is returned to the device's caller, which logs it locally; it is never sent); a NaN or infinite
  value refuses the whole update (PrivacyError);
- `weight * delta` travels in fixed point with resolution `RESOLUTION` = 2^-20 (about 9.5e-7), so the FedAvg
  mean is exact to within RESOLUTION / 2 per value (each device's rounding error is at most RESOLUTION / 2
  in units of weight * delta, and the sum is divided by a total weight >= the number of devices);
- each word `round(weight * delta / RESOLUTION)` has |word| <= MAX_EXAMPLES * VALUE_RANGE / RESOLUTION = 2^34
  and travels in offset binary (+2^47) as three 16-bit limbs; the limbs are what `secure_sum.to_secagg` hands
  to SecAgg+ (clipping range 1, 2^16 quantization levels, modulus 2^32: each limb crosses exactly), and
  `secure_sum.limb_sums_from_mean` recovers the exact integer sum of each limb (up to 65,535 devices).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch

from proper_fed.errors import ConfigError, PrivacyError
from proper_fed.federation.secure_sum import LIMB_BITS, MAX_DEVICES, QUANTIZATION_RANGE

VALUE_RANGE: Final = 4.0  # |delta| of one value, clipped
RESOLUTION: Final = 2.0**-20  # fixed-point step of weight * delta
MAX_EXAMPLES: Final = 1 << 12  # a device's FedAvg weight: min(examples, MAX_EXAMPLES)
WORD_LIMBS: Final = 3  # 48-bit words
WORD_OFFSET: Final = 1 << 47  # offset binary
HEADER: Final = ("devices", "weight")  # the words before the values
_MASK: Final = (1 << LIMB_BITS) - 1


@dataclass(frozen=True)
class SharedLayout:
    """The public order of a stage's shared tensors: names (sorted) and shapes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> SharedLayout:
        names = tuple(sorted(tensors))
        return cls(names, tuple(tuple(tensors[n].shape) for n in names))

    @property
    def values(self) -> int:
        """Floats in the shared tensors."""
        return sum(int(np.prod(s)) for s in self.shapes)

    @property
    def length(self) -> int:
        """Limbs in a device's vector."""
        return WORD_LIMBS * (len(HEADER) + self.values)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The tensors as one float64 row in layout order; ConfigError if they do not fit the layout."""
        if set(tensors) != set(self.names):
            wrong = sorted(set(tensors) ^ set(self.names))[:3]
            raise ConfigError(f"shared tensors do not fit the stage's layout: {wrong} ...")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ConfigError(f"shared tensor {name} has shape {tuple(t.shape)}, the layout {shape}")
            parts.append(t.detach().to("cpu", torch.float64).reshape(-1).numpy())
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, row: np.ndarray, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Inverse of `flatten`."""
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (self.values,):
            raise ConfigError(f"a row of {row.size} values; the layout has {self.values}")
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = int(np.prod(shape))
            out[name] = torch.from_numpy(row[at : at + n].copy()).reshape(shape).to(dtype)
            at += n
        return out

    def describe(self) -> dict:
        """The layout's public facts, for results.json (bytes per device and round follow from them)."""
        return {
            "tensors": len(self.names),
            "values": self.values,
            "integers_per_device": self.length,
            "limb_bits": LIMB_BITS,
            "value_range": VALUE_RANGE,
            "resolution": RESOLUTION,
            "max_examples": MAX_EXAMPLES,
        }


@dataclass(frozen=True)
class Encoded:
    """A device's vector of limbs, and how many of its values were clipped (kept on the device)."""

    limbs: np.ndarray
    clipped: int


def encode_update(delta: Mapping[str, torch.Tensor], examples: int, layout: SharedLayout) -> Encoded:
    """One device's update as its vector of limbs (int64, each in [0, 2^16)); see the module docstring."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ConfigError(f"a federated update needs at least one training example, got {examples!r}")
    row = layout.flatten(delta)
    if not np.isfinite(row).all():
        raise PrivacyError("a federated update holds a NaN or infinite value: the local stage diverged")
    clipped = int((np.abs(row) > VALUE_RANGE).sum())
    row = np.clip(row, -VALUE_RANGE, VALUE_RANGE)
    weight = min(examples, MAX_EXAMPLES)
    words = np.empty(len(HEADER) + row.size, dtype=np.int64)
    words[0], words[1] = 1, weight
    words[2:] = np.rint(row * weight / RESOLUTION).astype(np.int64)
    words += WORD_OFFSET
    limbs = (words[:, None] >> (LIMB_BITS * np.arange(WORD_LIMBS))) & _MASK  # (W, 3), low limb first
    return Encoded(limbs.reshape(-1), clipped)


@dataclass(frozen=True)
class FedAvg:
    """What the server learns from one round: the examples-weighted mean update, the summed weight, the
    number of devices."""

    mean: dict[str, torch.Tensor]
    weight: int
    devices: int


def decode_mean(limb_sums: np.ndarray, layout: SharedLayout, devices: int) -> FedAvg:
    """FedAvg's mean update from each limb's exact integer sum over `devices` vectors; ConfigError when the
    sum does not fit the layout or does not count `devices` devices."""
    limb_sums = np.asarray(limb_sums, dtype=np.int64)
    if limb_sums.shape != (layout.length,):
        raise ConfigError(
            f"a federated sum of {limb_sums.size} integers; this stage's layout has {layout.length}"
        )
    if not 1 <= devices <= MAX_DEVICES:
        raise ConfigError(f"{devices} devices: a secure sum covers 1 to {MAX_DEVICES} devices")
    if limb_sums.min(initial=0) < 0 or limb_sums.max(initial=0) > devices * (QUANTIZATION_RANGE - 1):
        raise ConfigError("the federated sum is not a sum of limbs: the SecAgg+ parameters do not match")
    parts = limb_sums.reshape(-1, WORD_LIMBS).copy()
    # The offset (2^47) is 2^15 in the top limb: take it off there first, so no int64 ever overflows.
    parts[:, -1] -= devices * (WORD_OFFSET >> (LIMB_BITS * (WORD_LIMBS - 1)))
    totals = sum(parts[:, j] << (LIMB_BITS * j) for j in range(WORD_LIMBS))  # (W,)
    if int(totals[0]) != devices:
        raise ConfigError(f"the federated sum counts {int(totals[0])} devices, not {devices}")
    weight = int(totals[1])
    if not devices <= weight <= devices * MAX_EXAMPLES:
        raise ConfigError(f"the federated sum's weight {weight} is impossible for {devices} devices")
    mean = totals[2:].astype(np.float64) * RESOLUTION / weight
    return FedAvg(layout.unflatten(mean), weight, devices)


def apply_mean(
    shared: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """FedAvg's new global tensors: each shared tensor plus the mean update, in the tensor's own dtype."""
    if set(shared) != set(mean):
        raise ConfigError("the mean update does not fit the shared tensors")
    return {k: (t.double() + mean[k].double().to(t.device)).to(t.dtype) for k, t in shared.items()}


def fedavg_direct(
    shared: Mapping[str, torch.Tensor], updates: list[tuple[Mapping[str, torch.Tensor], int]]
) -> dict[str, torch.Tensor]:
    """FedAvg computed directly from (local tensors, examples) pairs, weights capped as on the wire: the
    reference the secure path must equal within RESOLUTION / 2 (tests; no values are clipped here)."""
    weights = [min(n, MAX_EXAMPLES) for _, n in updates]
    total = sum(weights)
    out = {}
    for k, t in shared.items():
        acc = sum(
            w * (local[k].double() - t.double()) for (local, _), w in zip(updates, weights, strict=True)
        )
        out[k] = (t.double() + acc / total).to(t.dtype)
    return out
