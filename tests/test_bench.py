"""The benchmark: every figure is present and positive, the ratio is ours over peft's, and the CLI saves it.
(What the numbers are is the benchmark's business; no test here asserts a speed.)"""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from proper_fed.bench import run_benchmark
from proper_fed.config import AdapterConfig
from proper_fed.errors import ConfigError
from proper_fed.proper_linear import ProperLinear
from proper_fed.routing import RoutingContext
from proper_fed_cli.main import _register, app

_register()  # every sub-command, as `proper-fed` has them (with `bench` alone, typer would drop its name)

STAGE_KEYS = ("proper_step_s", "peft_lora_step_s", "ratio", "proper_tokens_per_s", "peft_tokens_per_s")
TINY = {"steps": 1, "warmup": 0, "seq_len": 32, "batch_size": 2}


def _positive(value) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def result():
    return run_benchmark("tiny", **TINY)


def test_every_stage_reports_times_throughput_and_a_ratio_of_ours_over_peft(result):
    for stage in ("user_stage", "group_stage"):
        figures = result[stage]
        for key in STAGE_KEYS:
            assert _positive(figures[key]), f"{stage}.{key} = {figures[key]!r}"
        assert figures["ratio"] == pytest.approx(figures["proper_step_s"] / figures["peft_lora_step_s"])
        tokens = TINY["batch_size"] * TINY["seq_len"]
        assert figures["proper_tokens_per_s"] == pytest.approx(tokens / figures["proper_step_s"])
        for side in ("proper_memory", "peft_memory"):
            assert all(_positive(v) for k, v in figures[side].items() if k != "peak_rss_delta_mib"), figures[
                side
            ]


def test_peft_rank_is_the_total_rank_proper_runs_through(result):
    a = result["config"]["adapters"]
    group = a["population_rank"] + a["num_experts"] * a["group_rank"]
    assert result["group_stage"]["peft_lora_rank"] == group
    assert result["user_stage"]["peft_lora_rank"] == group + a["user_rank"]
    assert "comparison" in result["notes"]


def test_model_memory_machine_and_config_are_reported(result):
    assert _positive(result["memory"]["nf4_mib"]) and _positive(result["memory"]["bf16_mib"])
    assert result["memory"]["nf4_mib"] < result["memory"]["bf16_mib"]
    assert _positive(result["machine"]["cpu_count"]) and _positive(result["machine"]["torch_threads"])
    assert result["machine"]["torch_version"]
    assert result["config"]["model"] == "tiny" and result["config"]["seq_len"] == TINY["seq_len"]
    json.dumps(result)  # JSON-ready as it is


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="steps=0"):
        run_benchmark("tiny", steps=0)


def test_cli_prints_the_json_and_writes_it_to_the_file(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    args = [
        "bench",
        "--model",
        "tiny",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
    ]
    res = CliRunner().invoke(app, [*args, "--warmup", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["config"]["seq_len"] == 16 and saved["config"]["batch_size"] == 2
    assert _positive(saved["user_stage"]["ratio"])
    assert json.loads(res.stdout) == saved


# ----- the speed work must not change what a ProperLinear computes -----
MODES = [
    (True, "none", False),
    (True, "user_router", False),
    (False, "user_router", False),
    (True, "lora_router", True),
    (True, "uniform", True),
    (True, "none", True),
]


def _terms(layer, x: torch.Tensor, ctx) -> torch.Tensor:
    """The module docstring's formula, one adapter at a time (experts through `_mix_experts`, which
    test_adapters checks against a loop over experts)."""
    out = layer.base(x)
    if ctx.population:
        out = out + layer.s_p * (x @ layer.lora_pop_A.T @ layer.lora_pop_B.T)
    xu = x @ layer.lora_user_A.T
    if ctx.experts != "none":
        if ctx.experts == "user_router":
            logits = x @ layer.lora_router_x.T + (ctx.user_emb @ layer.lora_router_e.T)[:, None, :]
        elif ctx.experts == "lora_router":
            logits = xu @ layer.lora_beta.T
        else:
            logits = torch.zeros(*x.shape[:-1], layer.k)
        out = out + layer._mix_experts(x, logits.softmax(-1))
    if ctx.user:
        out = out + layer.s_u * (xu @ layer.lora_user_B.T)
    return out


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"pop={m[0]}-{m[1]}-user={m[2]}")
def test_fused_forward_equals_the_sum_of_the_adapters_terms(mode):
    cfg = AdapterConfig(population_rank=4, group_rank=2, user_rank=3, num_experts=3, user_embedding_dim=8)
    ctx = RoutingContext()
    gen = torch.Generator().manual_seed(0)
    layer = ProperLinear(torch.nn.Linear(16, 24), cfg, ctx, gen)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    ctx.set_mode(*mode)
    ctx.user_emb = torch.randn(2, 8, generator=gen)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    got, want = layer(x), _terms(layer, x, ctx)
    params = [x, *layer.parameters()]
    got_grads = torch.autograd.grad(got.pow(2).sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad(want.pow(2).sum(), params, allow_unused=True)
    # fp32 round-off only: the fused matmuls sum in another order
    for g, w in [(got, want), *zip(got_grads, want_grads, strict=True)]:
        assert (g is None) == (w is None)
        if w is not None:
            assert (g - w).abs().max() <= 1e-5 * w.abs().max()
