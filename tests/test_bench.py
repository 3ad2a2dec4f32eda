"""The benchmark: every figure is present and positive, the ratio is ours over peft's, the matmul peak and the
share of it are measured, the nf4 device step sits beside full precision, the precision is the one "auto"
resolves to, and the CLI saves it. (What the numbers are is the benchmark's business; no test here asserts a
speed.)"""

import inspect
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from proper_fed.config import AdapterConfig, BackboneConfig
from proper_fed.errors import ConfigError
from proper_fed.model.backbone import load_backbone
from proper_fed.model.precision import compute_dtype, resolve_precision
from proper_fed.model.proper_linear import ProperLinear
from proper_fed.model.routing import RoutingContext
from proper_fed.tools.bench import PEAK_SIZE, _matmul_peak, _peak_notes, run_benchmark
from proper_fed_cli.main import app  # every sub-command, as `proper-fed` has them

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


def test_matmul_peak_is_measured_in_fp32_and_bf16_with_torchs_threads(result):
    peak = result["matmul_peak"]
    assert peak["threads"] == torch.get_num_threads() and peak["device"] == "cpu"
    for dtype in ("fp32", "bf16"):
        fig = peak[dtype]
        assert _positive(fig["gflops"]) and fig["reps"] >= 2 and fig["size"] <= PEAK_SIZE
        assert fig["gflops"] == pytest.approx(2 * fig["size"] ** 3 / min(fig["rep_s_all"]) / 1e9)


def test_a_slow_matmul_is_cut_to_its_budget_and_the_notes_say_so():
    # a zero budget stands in for bf16 on a CPU without native bf16 (~80x slower than fp32)
    fig = _matmul_peak(torch.float32, torch.device("cpu"), budget_s=0.0)
    assert fig["time_boxed"] and fig["reps"] == 2 and fig["size"] < PEAK_SIZE and _positive(fig["gflops"])
    note = _peak_notes({"bf16": fig})["matmul_peak_time_boxed"]
    assert f"{fig['size']}x{fig['size']}" in note
    assert _peak_notes({"fp32": fig | {"time_boxed": False}}) == {}


def test_training_flops_are_4n_through_the_frozen_base_plus_the_adapters(result):
    """FLOPs per step = tokens * (4*N + 4*R*S + 2*P): not 6*N, the frozen base gets no weight gradients."""
    model = load_backbone(BackboneConfig(model="tiny", device="cpu", dtype="fp32")).model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_params = sum(m.weight.numel() for m in linears.values())
    targets = result["config"]["adapters"]["target_modules"]
    width = sum(m.in_features + m.out_features for n, m in linears.items() if n.rsplit(".", 1)[-1] in targets)
    tokens = TINY["batch_size"] * TINY["seq_len"]
    for stage in ("user_stage", "group_stage"):
        figures = result[stage]
        for side, step in (("proper", "proper_step_s"), ("peft", "peft_lora_step_s")):
            p = figures[f"{side}_trainable_params"]
            want = tokens * (4 * n_params + 4 * figures["peft_lora_rank"] * width + 2 * p)
            assert figures["train_flops_per_step"][side] == want
            assert figures[f"{side}_gflops"] == pytest.approx(want / figures[step] / 1e9)
    assert "4*N" in result["notes"]["flops"]


def test_share_of_peak_is_against_the_peak_of_the_dtype_used(result):
    precision = result["config"]["precision"]
    dtype = "fp32" if precision["dtype"] == "fp32" else "bf16"
    peak = result["matmul_peak"][dtype]["gflops"]
    for stage in ("user_stage", "group_stage"):
        figures = result[stage]
        assert figures["peak_dtype"] == dtype
        for side in ("proper", "peft"):
            share = figures[f"{side}_share_of_peak"]
            assert 0 < share <= 1.5
            assert share == pytest.approx(figures[f"{side}_gflops"] / peak)
    assert 0 < result["device_step"]["nf4_share_of_peak"] <= 1.5


def test_the_nf4_device_step_is_timed_beside_the_full_precision_one(result):
    step = result["device_step"]
    assert _positive(step["nf4_step_s"]) and _positive(step["full_precision_step_s"])
    assert len(step["nf4_step_s_all"]) == TINY["steps"]
    # the full-precision side is the user stage's PROPER step, timed in the same rotation
    assert step["full_precision_step_s"] == result["user_stage"]["proper_step_s"]
    assert step["nf4_over_full_precision"] == pytest.approx(
        step["nf4_step_s"] / step["full_precision_step_s"]
    )
    auto = resolve_precision("auto", torch.device("cpu"))
    assert step["full_precision_dtype"] == auto.dtype
    assert step["nf4_compute_dtype"] == ("bf16" if compute_dtype(auto) == torch.bfloat16 else "fp32")
    assert _positive(step["nf4_memory"]["saved_for_backward_mib"])


def test_the_precision_recorded_is_what_auto_resolves_to_with_the_cpu_flags(result):
    auto = resolve_precision("auto", torch.device("cpu"))
    assert result["config"]["dtype"] == "auto"
    assert result["config"]["precision"] == json.loads(json.dumps(auto.to_dict()))
    assert set(result["config"]["precision"]["flags"]) <= set(result["machine"]["cpu_flags"])
    assert result["machine"]["cpu"] == auto.hardware


def test_auto_is_the_default_dtype_of_the_library_and_the_cli():
    assert inspect.signature(run_benchmark).parameters["dtype"].default == "auto"
    # the CLI side: test_cli_prints_the_json_and_writes_it_to_the_file passes no --dtype and finds "auto"


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
    res = CliRunner().invoke(app, [*args, "--warmup", "0", "--device", "cpu", "--no-nf4"])  # no --dtype
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["config"]["seq_len"] == 16 and saved["config"]["batch_size"] == 2
    assert _positive(saved["user_stage"]["ratio"])
    assert saved["config"]["dtype"] == "auto"
    assert saved["config"]["precision"]["dtype"] == resolve_precision("auto", torch.device("cpu")).dtype
    assert saved["config"]["nf4"] is False and "device_step" not in saved
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
    """The module docstring's formula, one adapter at a time, the experts as a loop over experts."""
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
        gates = logits.softmax(-1)  # (..., k)
        for i in range(layer.k):
            expert = x @ layer.lora_expert_A[i].T @ layer.lora_expert_B[i].T  # (..., out)
            out = out + gates[..., i : i + 1] * layer.s_g * expert
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
