"""dtype="auto": bf16 autocast only where the hardware computes bf16 natively, fp32 elsewhere (STACK.md)."""

import logging
import platform
import types

import pytest
import torch

from proper_fed.config import BackboneConfig
from proper_fed.model import precision
from proper_fed.model.backbone import load_backbone

CPU = torch.device("cpu")


def _flags(monkeypatch, **flags):
    # torch returns a read-only mappingproxy with a few non-flag entries, as the real one does
    caps = types.MappingProxyType({"avx2": True, "cpu_name": "test CPU", "l2_cache_size": 1 << 20, **flags})
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


def test_auto_is_fp32_on_a_cpu_with_only_avx2(monkeypatch):
    _flags(monkeypatch, avx512_f=True)  # AVX512 without BF16 does not count: bf16 is emulated there
    p = precision.resolve_precision("auto", CPU)
    assert (p.dtype, p.native_bf16) == ("fp32", False)
    assert "avx2" in p.flags and "avx512_bf16" not in p.flags
    assert precision.compute_dtype(p) == torch.float32


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_autocast_on_a_cpu_with_native_bf16(monkeypatch, flag):
    _flags(monkeypatch, **{flag: True})
    p = precision.resolve_precision("auto", CPU)
    assert (p.dtype, p.native_bf16) == ("fp32-autocast-bf16", True)
    assert flag in p.flags
    assert precision.compute_dtype(p) == torch.bfloat16


def test_forcing_bf16_without_native_bf16_is_honoured_with_a_warning(monkeypatch, caplog):
    _flags(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="proper_fed.model.precision"):
        p = precision.resolve_precision("fp32-autocast-bf16", CPU)
    assert p.dtype == "fp32-autocast-bf16"
    assert "50 times slower" in caplog.text and "dtype='auto'" in caplog.text


def test_forced_fp32_never_warns(monkeypatch, caplog):
    _flags(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="proper_fed.model.precision"):
        assert precision.resolve_precision("fp32", CPU).dtype == "fp32"
    assert not caplog.text


def test_older_torch_without_get_capabilities_falls_back_to_the_avx512_bf16_probe(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.resolve_precision("auto", CPU).dtype == "fp32-autocast-bf16"


def test_the_default_config_is_auto_and_the_backbone_carries_the_resolved_choice(monkeypatch):
    assert BackboneConfig().dtype == "auto"
    _flags(monkeypatch)
    b = load_backbone(BackboneConfig(model="tiny", device="cpu"))
    assert b.config.dtype == "fp32" and b.precision.requested == "auto"
    assert not isinstance(b.autocast(), torch.autocast)  # a no-op context: plain fp32
    _flags(monkeypatch, avx512_bf16=True)
    b = load_backbone(BackboneConfig(model="tiny", device="cpu"))
    assert b.config.dtype == "fp32-autocast-bf16"
    assert isinstance(b.autocast(), torch.autocast)


def test_the_real_cpu_flags_are_read(monkeypatch):
    if platform.machine() not in ("x86_64", "AMD64") or not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("torch reads x86 CPU flags only")
    flags = precision.cpu_flags()
    assert flags.get("avx2") is not None, "torch's CPU flags were not read"
    p = precision.resolve_precision("auto", CPU)
    native = bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    assert p.native_bf16 == native
    assert p.dtype == ("fp32-autocast-bf16" if native else "fp32")
