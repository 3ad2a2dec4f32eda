"""Training-step speed and memory of PROPER's user and group stages, beside a plain peft LoRA of the same total
rank on the same backbone, batch and precision; the device's user-stage step on the backbone in nf4 beside
full precision; this machine's matmul peak (fp32 and bf16) and our training throughput as a share of it; plus
the backbone's weight memory in nf4 and in bf16.

`run_benchmark` returns a JSON-ready dict (the `proper-fed bench` command prints and saves it). Every figure
says what it measures in `notes`: step times are medians of timed steps after warm-up, and the CPU memory
figures are what a process can honestly observe, not an allocator trace.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from proper_fed.config import AdapterConfig, BackboneConfig, TrainConfig
from proper_fed.errors import ConfigError, ModelLoadError
from proper_fed.model.backbone import Backbone, load_backbone
from proper_fed.model.precision import (
    REPORTED_CPU_FLAGS,
    Precision,
    compute_dtype,
    cpu_flags,
    cpu_name,
    resolve_precision,
)
from proper_fed.model.proper_model import ProperModel
from proper_fed.model.routing import constraint_loss
from proper_fed.train.batching import target_loss

log = logging.getLogger(__name__)

MIB = 2**20
PEAK_SIZE, PEAK_REPS, PEAK_PROBE_SIZE, PEAK_MIN_SIZE = 1024, 10, 512, 128
PEAK_BUDGET_S = 3.0  # per dtype: bf16 without native support runs ~80x slower than fp32 and is cut to fit
NOTES = {
    "comparison": (
        "Same backbone, batch, precision and optimiser (AdamW) for both sides; the peft LoRA sits on the same "
        "target linears with rank = the total rank of the low-rank paths PROPER's forward runs through in that "
        "stage (user stage: r_p + k*r_g + r_u, population unmerged as the device runs it; group stage: "
        "r_p + k*r_g). Each token then does about the same adapter matmul work on both sides; PROPER adds the "
        "router, the softmax and the gating, and trains fewer parameters (only its own scope). This is the "
        "comparison that isolates PROPER's overhead. A peft LoRA of only the trainable rank would be cheaper "
        "but would not compute what PROPER computes."
    ),
    "step": (
        "One step = forward on random tokens (every token is a target), next-token cross-entropy (+ the "
        "constraint loss on recorded gates in the group stage), backward, AdamW step, zero_grad. Both sides "
        "are loaded together; each runs `warmup` untimed steps (at least one, which also takes the memory "
        "figures) on its own, then the timed steps alternate between the sides (ABBA..., with the nf4 side "
        "in the middle in the user stage: ABCCBA...) so that a change in the machine's load hits both. "
        "step_s is the median over `steps` timed steps; tokens_per_s = batch_size*seq_len/step_s; "
        "*_step_s_all lists every timed step."
    ),
    "memory_per_stage": (
        "saved_for_backward_mib: bytes of the distinct tensors autograd keeps from forward to backward in one "
        "step (the model's own parameters excluded; autocast's bf16 copies of weights included), counted "
        "exactly with saved-tensor hooks; adapter_saved_for_backward_mib: the part saved inside the adapter "
        "layers but outside their base linear, i.e. what our layers add. adapter_params_mib: every adapter "
        "tensor the model holds (frozen scopes too). peak_rss_delta_mib (CPU): the process's peak resident "
        "memory during that side's warm-up steps (VmHWM, reset before) minus its resident memory before; it "
        "includes the whole model's activations, gradients and optimiser state, and can undercount when the "
        "allocator reuses memory freed earlier in the process. cuda_peak_delta_mib (GPU): max_memory_allocated "
        "minus memory_allocated before."
    ),
    "precision": (
        "config.dtype is what was asked (default 'auto'); config.precision is what it resolved to on this "
        "device (proper_fed.model.precision): bf16 autocast only where bf16 is native (a CUDA GPU with bf16, an x86 "
        "CPU with avx512_bf16 or amx_bf16), fp32 otherwise; `flags` are the CPU flags (or CUDA capability) "
        "the choice was made from. machine.cpu_flags lists the CPU's own flags of interest."
    ),
    "matmul_peak": (
        "This machine's matmul peak per dtype: a square size x size matmul (default 1024) with torch's "
        "current thread count (machine.torch_threads), one untimed warm-up, then `reps` timed reps; gflops = "
        "2*size^3 / the fastest rep. A probe (a 512 x 512 matmul after a warm-up) comes first; each dtype gets a "
        "3 s budget: when the warm-up and two reps would not fit (bf16 on a CPU without native bf16 runs "
        "~50-80x slower than fp32) the size is halved until they do, and the reps stop (at least 2) once the "
        "budget is spent; `time_boxed` says so and notes.matmul_peak_time_boxed gives the sizes."
    ),
    "flops": (
        "train_flops_per_step = tokens * (4*N + 4*R*S + 2*P), the standard estimate for a forward and "
        "backward through a frozen base: 2 FLOPs per weight per token forward, 2 more backward for the "
        "activation gradients, and no weight gradients for frozen weights (so not 6*N). N: the backbone's "
        "linear parameter count (every nn.Linear, lm_head included); R*S: the adapter weights the forward "
        "multiplies by, R the total rank run (= peft_lora_rank), S = sum of (in + out) over the wrapped "
        "linears; P: the trainable parameters, which also get weight gradients (2 FLOPs per weight per "
        "token). Left out: attention scores (QK^T and AV, about 4*layers*seq_len*hidden per token forward, a "
        "few % at seq_len 128), the router and gating, norms, softmax, the optimiser. gflops = "
        "train_flops_per_step / step_s / 1e9; share_of_peak = gflops / matmul_peak of the dtype the matmuls "
        "run in (`peak_dtype`: bf16 under bf16 autocast or bf16 weights, fp32 otherwise)."
    ),
    "device_step": (
        "The device's step: PROPER's user stage (as in user_stage) on the backbone loaded in 4 bits "
        "(bitsandbytes nf4, compute dtype by the same precision rule, the device's setting) beside the same "
        "step on the full-precision backbone. The nf4 side runs in the user stage's rotation, in the middle "
        "(PROPER, nf4, peft, then peft, nf4, PROPER, ...), so PROPER and peft keep their ABBA symmetry; "
        "full_precision_step_s is user_stage.proper_step_s. bitsandbytes trains through 4-bit layers by "
        "dequantizing each weight, then a normal matmul, so the nf4 step is the fp32 step plus dequantization."
    ),
    "model_memory": (
        "nf4_mib and bf16_mib: model.get_memory_footprint() of the backbone loaded in nf4 (bitsandbytes, "
        "non-quantized parts in bf16) and in bf16. get_memory_footprint does not count the nf4 block scales "
        "(quant_state.absmax, held outside parameters); nf4_quant_state_mib gives them."
    ),
}


@dataclass
class _Side:
    """One side of a stage's comparison (PROPER or peft): its training step and what its memory figures need."""

    step: Callable[[], None]
    model: nn.Module
    layers: dict[nn.Module, nn.Module]  # adapter layer -> its base linear
    adapter_params: list[torch.Tensor]
    trainable_params: int


def run_benchmark(
    model: str = "tiny",
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 3,
    warmup: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    adapters: AdapterConfig | None = None,
    nf4: bool = True,
) -> dict:
    """Time PROPER's user and group stages and a peft LoRA of the same total rank, the user stage in nf4 when
    `nf4`, and this machine's matmul peak; see `NOTES` for what each figure is. `model` is "tiny",
    "smollm2-135m" or a local folder, as for `load_backbone`; `dtype` "auto" resolves by
    `proper_fed.model.precision`."""
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 2),
        ("steps", steps, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid: use an integer >= {low}")
    adapters = adapters or AdapterConfig()
    load_at_start = _load_average()
    bcfg = BackboneConfig(model=model, device=device, dtype=dtype)
    bench = _Bench(bcfg, adapters, batch_size, seq_len, steps, warmup)
    peak = {
        name: _matmul_peak(dt, bench.device)
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    k, r_p, r_g, r_u = adapters.num_experts, adapters.population_rank, adapters.group_rank, adapters.user_rank
    user = bench.stage("user", peft_rank=r_p + k * r_g + r_u, peak=peak, nf4=nf4)
    device_step = user.pop("device_step", None)
    result = {
        "user_stage": user,
        "group_stage": bench.stage("group", peft_rank=r_p + k * r_g, peak=peak),
        "device_step": device_step,
        "matmul_peak": peak | {"threads": torch.get_num_threads(), "device": str(bench.device)},
        "memory": _model_memory(bcfg) | {"process_peak_rss_mib": _process_peak_rss() / MIB},
        "machine": _machine()
        | {"load_average_1m_at_start": load_at_start, "load_average_1m_at_end": _load_average()},
        "config": {
            "model": model,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "warmup": warmup,
            "dtype": dtype,
            "precision": _jsonable(bench.precision.to_dict()),
            "nf4": nf4,
            "device": str(bench.device),
            "adapters": _jsonable(adapters.to_dict()),
            "constraint_weight": TrainConfig().constraint_weight,
        },
        "notes": NOTES | _peak_notes(peak),
    }
    if device_step is None:
        del result["device_step"]
    return result


class _Bench:
    def __init__(
        self,
        bcfg: BackboneConfig,
        adapters: AdapterConfig,
        batch_size: int,
        seq_len: int,
        steps: int,
        warmup: int,
    ):
        self.bcfg, self.adapters = bcfg, adapters
        self.batch_size, self.seq_len, self.steps, self.warmup = batch_size, seq_len, steps, warmup
        backbone = self._fresh_backbone()
        self.device = backbone.device
        self.precision: Precision = backbone.precision or resolve_precision(bcfg.dtype, backbone.device)
        self.linear_params, self.adapter_width = _linear_sizes(backbone.model, adapters.target_modules)
        vocab = backbone.model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)  # (B, T)
        self.batch = {
            "input_ids": ids.to(self.device),
            "labels": ids.to(self.device),
            "attention_mask": torch.ones_like(ids).to(self.device),
        }
        self.user_ids = [
            f"user{i}" for i in range(batch_size)
        ]  # one user per row: the constraint loss has work
        del backbone

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def _fresh_backbone(self, load_in_4bit: bool = False) -> Backbone:
        torch.manual_seed(0)
        return load_backbone(dataclasses.replace(self.bcfg, load_in_4bit=load_in_4bit))

    def stage(self, stage: str, peft_rank: int, peak: dict[str, dict], nf4: bool = False) -> dict:
        """One stage's comparison; with `nf4` (user stage) also the device step on the nf4 backbone, timed in
        the same rotation (under the key "device_step")."""
        log.info("bench %s stage: PROPER and a peft LoRA of rank %d", stage, peft_rank)
        sides = {"proper": self._proper(stage), "peft": self._peft(peft_rank)}
        nf4_error = None
        if nf4:
            try:
                sides["nf4"] = self._proper(stage, self._fresh_backbone(load_in_4bit=True))
            except (ModelLoadError, ImportError, RuntimeError) as err:  # report why, keep the other figures
                log.warning("nf4 backbone failed, device_step left out: %s", err)
                nf4_error = str(err)
        memory = {name: self._warm_up(side) for name, side in sides.items()}
        # nf4 in the middle: PROPER and peft stay symmetric (ABBA) whether or not it runs
        order = [(n, sides[n]) for n in ("proper", "nf4", "peft") if n in sides]
        times = self._time(order)
        med = {name: statistics.median(t) for name, t in times.items()}
        p, q = med["proper"], med["peft"]
        peak_dtype = "fp32" if self.precision.dtype == "fp32" else "bf16"
        flops = {name: self._train_flops(peft_rank, side.trainable_params) for name, side in sides.items()}
        result = {
            "proper_step_s": p,
            "peft_lora_step_s": q,
            "ratio": p / q,
            "proper_tokens_per_s": self.tokens / p,
            "peft_tokens_per_s": self.tokens / q,
            "proper_step_s_all": times["proper"],
            "peft_lora_step_s_all": times["peft"],
            "peft_lora_rank": peft_rank,
            "proper_trainable_params": sides["proper"].trainable_params,
            "peft_trainable_params": sides["peft"].trainable_params,
            "proper_memory": memory["proper"],
            "peft_memory": memory["peft"],
            "train_flops_per_step": {"proper": flops["proper"], "peft": flops["peft"]},
            "proper_gflops": flops["proper"] / p / 1e9,
            "peft_gflops": flops["peft"] / q / 1e9,
            "proper_share_of_peak": flops["proper"] / p / 1e9 / peak[peak_dtype]["gflops"],
            "peft_share_of_peak": flops["peft"] / q / 1e9 / peak[peak_dtype]["gflops"],
            "peak_dtype": peak_dtype,
        }
        if "nf4" in sides:
            n = med["nf4"]
            nf4_dtype = "bf16" if compute_dtype(self.precision) == torch.bfloat16 else "fp32"
            result["device_step"] = {
                "nf4_step_s": n,
                "full_precision_step_s": p,
                "nf4_over_full_precision": n / p,
                "nf4_tokens_per_s": self.tokens / n,
                "full_precision_tokens_per_s": self.tokens / p,
                "nf4_step_s_all": times["nf4"],
                "full_precision_step_s_all": times["proper"],
                "nf4_compute_dtype": nf4_dtype,
                "full_precision_dtype": self.precision.dtype,
                "train_flops_per_step": flops["nf4"],
                "nf4_gflops": flops["nf4"] / n / 1e9,
                "nf4_share_of_peak": flops["nf4"] / n / 1e9 / peak[nf4_dtype]["gflops"],
                "nf4_memory": memory["nf4"],
            }
        elif nf4_error is not None:
            result["device_step"] = {"error": nf4_error}
        return result

    def _train_flops(self, rank: int, trainable: int) -> float:
        """FLOPs of one training step through the frozen base (NOTES["flops"]): 4*N + 4*R*S + 2*P per token."""
        return self.tokens * (4 * self.linear_params + 4 * rank * self.adapter_width + 2 * trainable)

    def _proper(self, stage: str, backbone: Backbone | None = None) -> _Side:
        model = ProperModel(backbone or self._fresh_backbone(), self.adapters, seed=0)
        if stage == "user":  # stage 3 as the device runs it: frozen population + experts, LoRA-aware router
            model.reset_user(0)
            model.set_mode(population=True, experts="lora_router", user=True)
            trainable, rows, weight = model.set_trainable(["user"]), None, 0.0
        else:  # stage 2: user-aware router, constraint loss on the recorded gates
            model.set_users(self.user_ids)
            model.set_mode(population=True, experts="user_router")
            weight = TrainConfig().constraint_weight
            model.ctx.record = weight > 0
            trainable, rows = model.set_trainable(["group"]), model.user_rows(self.user_ids)
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        batch = self.batch

        def step() -> None:
            out = model(batch["input_ids"], batch["attention_mask"], user_rows=rows, use_cache=False)
            loss = target_loss(out.logits, batch["labels"])
            if weight > 0:
                loss = loss + weight * constraint_loss(model.ctx.gates, batch["attention_mask"], rows)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        adapter_params = [p for layer in model.layers.values() for p in layer.parameters(recurse=False)]
        adapter_params.append(model.lora_user_embedding.weight)
        layers = {m: m.base for m in model.layers.values()}
        return _Side(step, model.lm, layers, adapter_params, sum(p.numel() for p in trainable))

    def _peft(self, rank: int) -> _Side:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        backbone = self._fresh_backbone()
        cfg = LoraConfig(
            r=rank,
            lora_alpha=self.adapters.alpha,
            target_modules=list(self.adapters.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(backbone.model, cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        batch = self.batch

        def step() -> None:
            with backbone.autocast():
                out = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                )
            target_loss(out.logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        layers = {m: m.base_layer for m in model.modules() if isinstance(m, LoraLayer)}
        adapter_params = [p for n, p in model.named_parameters() if "lora_" in n]
        return _Side(step, model, layers, adapter_params, sum(p.numel() for p in trainable))

    def _warm_up(self, side: _Side) -> dict[str, float]:
        """Run one side's warm-up steps (at least one) alone and return its memory figures."""
        _release_memory(self.device)
        with _peak_memory(self.device) as peak:
            with _SavedTensorCounter(side.model, side.layers) as counter:  # the first step also counts
                side.step()
            for _ in range(self.warmup - 1):
                side.step()
        return peak | {
            "saved_for_backward_mib": counter.total / MIB,
            "adapter_saved_for_backward_mib": counter.adapter / MIB,
            "adapter_params_mib": sum(p.numel() * p.element_size() for p in side.adapter_params) / MIB,
        }

    def _time(self, order: list[tuple[str, _Side]]) -> dict[str, list[float]]:
        """Run the sides step by step in `order`, then reversed, and so on (ABBA... for two sides, ABCCBA... for
        three), so that a change in the machine's load hits every side."""
        times: dict[str, list[float]] = {name: [] for name, _ in order}
        for i in range(self.steps):
            for name, side in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                side.step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times[name].append(time.perf_counter() - t0)
        return times


class _SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for backward during one step, excluding the model's own
    parameters; the part saved inside an adapter layer but outside its base linear is counted separately."""

    def __init__(self, model: nn.Module, layers: dict[nn.Module, nn.Module]):
        self.model, self.layers = model, layers
        self.seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.total = self.adapter = 0
        self._in_adapter = self._in_base = 0
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
            if self._in_adapter and not self._in_base:
                self.adapter += storage.nbytes()
        return t

    def _count(self, attr: str, delta: int) -> Callable:
        def hook(*_args) -> None:
            setattr(self, attr, getattr(self, attr) + delta)

        return hook

    def __enter__(self) -> _SavedTensorCounter:
        for wrapper, base in self.layers.items():
            for module, attr in ((wrapper, "_in_adapter"), (base, "_in_base")):
                self._handles.append(module.register_forward_pre_hook(self._count(attr, 1)))
                self._handles.append(module.register_forward_hook(self._count(attr, -1)))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []


# ----- process memory -----
def _release_memory(device: torch.device) -> None:
    """Hand freed memory back to the OS, so the next run's resident-memory delta starts from a clean floor."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _rss() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # outside Linux

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _process_peak_rss() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # KiB on Linux, bytes on macOS: approximate


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yield a dict that is filled, on exit, with the peak memory of the body over the memory before it."""
    figures: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield figures
        figures["cuda_peak_delta_mib"] = (torch.cuda.max_memory_allocated(device) - before) / MIB
        return
    before, resettable = _rss(), _reset_peak_rss()
    yield figures
    if resettable:
        figures["peak_rss_delta_mib"] = (_process_peak_rss() - before) / MIB
    else:  # the peak cannot be reset: only the process's lifetime peak is known
        figures["process_peak_rss_mib"] = _process_peak_rss() / MIB


def _model_memory(bcfg: BackboneConfig) -> dict[str, float]:
    """Weight memory of the backbone loaded in nf4 and in bf16."""
    figures: dict[str, float] = {}
    with _quiet(
        "proper_fed.model.precision"
    ):  # no math runs in these loads: a slow-bf16 warning would mislead
        try:
            nf4 = load_backbone(
                BackboneConfig(model=bcfg.model, device=bcfg.device, dtype="bf16", load_in_4bit=True)
            )
        except Exception as err:  # noqa: BLE001 - report why, keep the timing results
            log.warning("nf4 load failed, memory.nf4_mib left out: %s", err)
            figures["nf4_error"] = str(err)
        else:
            figures["nf4_mib"] = nf4.model.get_memory_footprint() / MIB
            figures["nf4_quant_state_mib"] = _quant_state_bytes(nf4.model) / MIB
            del nf4
        bf16 = load_backbone(BackboneConfig(model=bcfg.model, device=bcfg.device, dtype="bf16"))
    figures["bf16_mib"] = bf16.model.get_memory_footprint() / MIB
    return figures


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Drop warnings of one logger for the body."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _quant_state_bytes(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for t in (state.absmax, state.code, getattr(getattr(state, "state2", None), "absmax", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _machine() -> dict:
    found = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cpu_flags": [f for f in REPORTED_CPU_FLAGS if found.get(f, False)],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# ----- matmul peak and FLOP counts -----
def _matmul_peak(
    dtype: torch.dtype,
    device: torch.device,
    size: int = PEAK_SIZE,
    reps: int = PEAK_REPS,
    budget_s: float = PEAK_BUDGET_S,
) -> dict:
    """GFLOP/s of a square `size` matmul in `dtype` (NOTES["matmul_peak"]), cut to fit `budget_s` when slow:
    a smaller matrix when even the warm-up and two reps would not fit, fewer reps when the budget runs out."""
    # The probe is 512, not smaller: with 2 threads on a busy machine every op can stall for milliseconds,
    # which would make a small probe read far below the peak and cut the measurement for nothing.
    rate = 2 * PEAK_PROBE_SIZE**3 / min(_matmul_times(dtype, device, PEAK_PROBE_SIZE, 1))  # FLOP/s, roughly
    n = size
    while 3 * 2 * n**3 / rate > budget_s and n > PEAK_MIN_SIZE:
        n //= 2
    times = _matmul_times(dtype, device, n, reps, budget_s)
    return {
        "gflops": 2 * n**3 / min(times) / 1e9,
        "size": n,
        "reps": len(times),
        "time_boxed": (n, len(times)) != (size, reps),
        "probe_gflops": rate / 1e9,
        "rep_s_all": times,
    }


def _matmul_times(
    dtype: torch.dtype, device: torch.device, n: int, reps: int, budget_s: float = math.inf
) -> list[float]:
    """Seconds of up to `reps` (n, n) @ (n, n) matmuls after one untimed warm-up; at least 2 once `budget_s`
    (warm-up included) is spent."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    times: list[float] = []
    start = time.perf_counter()
    for i in range(reps + 1):
        t0 = time.perf_counter()
        a @ b  # (n, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
        if len(times) >= min(2, reps) and time.perf_counter() - start > budget_s:
            break
    return times


def _peak_notes(peak: dict[str, dict]) -> dict[str, str]:
    """Say which peak measurements were cut to their time budget, and to what."""
    cut = [
        f"{name}: probe {fig['probe_gflops']:.3g} GFLOP/s, so measured on {fig['size']}x{fig['size']} with "
        f"{fig['reps']} reps instead of {PEAK_SIZE}x{PEAK_SIZE} with {PEAK_REPS}"
        for name, fig in peak.items()
        if fig["time_boxed"]
    ]
    if not cut:
        return {}
    return {
        "matmul_peak_time_boxed": (
            f"Cut to a {PEAK_BUDGET_S:g} s budget per dtype (a dtype this slow: bf16 without native support, "
            "or a busy machine): "
            + "; ".join(cut)
            + ". A smaller matmul may run a little below the dtype's peak."
        )
    }


def _linear_sizes(model: nn.Module, targets: tuple[str, ...] | list[str]) -> tuple[int, int]:
    """N: weights of every linear of the unwrapped backbone (lm_head included, tied or not); S: the sum of
    in + out features over the linears the adapters wrap."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    n = sum(m.in_features * m.out_features for _, m in linears)
    s = sum(m.in_features + m.out_features for name, m in linears if name.rsplit(".", 1)[-1] in targets)
    return n, s


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
