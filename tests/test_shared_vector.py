"""The shared-tensor codec of federated stages 1-2: a device's update crosses SecAgg+ as limbs whose exact
sum gives FedAvg within the stated resolution; out-of-range values are clipped explicitly, NaN refused."""

import numpy as np
import pytest
import torch

from proper_fed.errors import ConfigError, PrivacyError
from proper_fed.federation import secure_sum, shared_vector
from proper_fed.federation.shared_vector import (
    MAX_EXAMPLES,
    RESOLUTION,
    VALUE_RANGE,
    SharedLayout,
    apply_mean,
    decode_mean,
    encode_update,
    fedavg_direct,
)


def _tensors(seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.lora_B": torch.randn(4, 3, generator=g) * scale,
        "a.lora_A": torch.randn(3, 5, generator=g) * scale,
        "lora_user_embedding.weight": torch.randn(1, 8, generator=g) * scale,
    }


def _through_secagg(vectors: list[np.ndarray]) -> np.ndarray:
    """What the server recovers: the workflow's mean of the floats, turned back into exact limb sums."""
    mean = np.mean([secure_sum.to_secagg(v) for v in vectors], axis=0)
    return secure_sum.limb_sums_from_mean(mean, len(vectors))


def test_layout_round_trips_and_is_the_same_for_every_device():
    t = _tensors(0)
    layout = SharedLayout.of(t)
    assert layout.names == tuple(sorted(t)) and layout == SharedLayout.of(_tensors(7))
    back = layout.unflatten(layout.flatten(t))
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert layout.length == 3 * (2 + 12 + 15 + 8)
    with pytest.raises(ConfigError, match="shape"):
        layout.flatten({**t, "a.lora_A": torch.zeros(5, 3)})
    with pytest.raises(ConfigError, match="layout"):
        layout.flatten({k: v for k, v in t.items() if k != "a.lora_A"})


def test_fedavg_through_the_codec_equals_fedavg_within_the_stated_resolution():
    shared = _tensors(0)
    layout = SharedLayout.of(shared)
    updates = [
        ({k: v + _tensors(10 + i)[k] for k, v in shared.items()}, n) for i, n in enumerate((3, 40, 9000))
    ]
    vectors = []
    for local, n in updates:
        enc = encode_update({k: local[k] - shared[k] for k in shared}, n, layout)
        assert enc.clipped == 0 and enc.limbs.shape == (layout.length,)
        assert enc.limbs.min() >= 0 and enc.limbs.max() < 2**16
        vectors.append(enc.limbs)
    avg = decode_mean(_through_secagg(vectors), layout, 3)
    assert avg.devices == 3 and avg.weight == 3 + 40 + MAX_EXAMPLES  # the weight cap is applied
    got, want = apply_mean(shared, avg.mean), fedavg_direct(shared, updates)
    for k in shared:
        # float32 storage adds its own rounding on top of the codec's RESOLUTION / 2
        assert (got[k].double() - want[k].double()).abs().max() <= RESOLUTION / 2 + 1e-7, k


def test_negative_and_extreme_values_round_trip_exactly_in_fixed_point():
    layout = SharedLayout(("x",), ((6,),))
    values = torch.tensor(
        [-VALUE_RANGE, VALUE_RANGE, 0.0, -RESOLUTION, 3 * RESOLUTION, -1.5], dtype=torch.float64
    )
    enc = encode_update({"x": values}, MAX_EXAMPLES, layout)
    avg = decode_mean(enc.limbs, layout, 1)
    assert torch.equal(avg.mean["x"].double(), values.float().double())  # all multiples of RESOLUTION


def test_out_of_range_values_are_clipped_explicitly_and_nan_is_refused():
    layout = SharedLayout(("x",), ((3,),))
    enc = encode_update({"x": torch.tensor([10.0, -0.5, -7.0])}, 1, layout)
    assert enc.clipped == 2
    assert decode_mean(enc.limbs, layout, 1).mean["x"].tolist() == [VALUE_RANGE, -0.5, -VALUE_RANGE]
    with pytest.raises(PrivacyError, match="NaN"):
        encode_update({"x": torch.tensor([float("nan"), 0.0, 0.0])}, 1, layout)
    with pytest.raises(ConfigError, match="training example"):
        encode_update({"x": torch.zeros(3)}, 0, layout)


def test_a_sum_that_does_not_fit_the_layout_is_refused():
    layout = SharedLayout(("x",), ((3,),))
    enc = encode_update({"x": torch.zeros(3)}, 5, layout)
    with pytest.raises(ConfigError, match="devices, not 2"):
        decode_mean(enc.limbs, layout, 2)
    with pytest.raises(ConfigError, match="layout has"):
        decode_mean(enc.limbs[:-3], layout, 1)
    assert shared_vector.SharedLayout.of({"x": torch.zeros(3)}).describe()["integers_per_device"] == 15
