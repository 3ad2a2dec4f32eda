"""Training-step speed and memory of PROPER's user and group stages, beside a plain peft LoRA of the same total
rank on the same backbone, batch and precision; plus the backbone's weight memory in nf4 and in bf16.

`run_benchmark` returns a JSON-ready dict (the `proper-fed bench` command prints and saves it). Every figure
says what it measures in `notes`: step times are medians of timed steps after warm-up, and the CPU memory
figures are what a process can honestly observe, not an allocator trace.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from proper_fed.backbone import Backbone, load_backbone
from proper_fed.batching import target_loss
from proper_fed.config import AdapterConfig, BackboneConfig, TrainConfig
from proper_fed.errors import ConfigError
from proper_fed.proper_model import ProperModel
from proper_fed.routing import constraint_loss

log = logging.getLogger(__name__)

MIB = 2**20
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
        "figures) on its own, then the timed steps alternate between the sides (ABBA...) so that a change in "
        "the machine's load hits both. step_s is the median over `steps` timed steps; tokens_per_s = "
        "batch_size*seq_len/step_s; *_step_s_all lists every timed step."
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
    batch_size: int = 8,
    seq_len: int = 256,
    steps: int = 5,
    warmup: int = 2,
    dtype: str = "fp32-autocast-bf16",
    device: str = "auto",
    adapters: AdapterConfig | None = None,
) -> dict:
    """Time PROPER's user and group stages and a peft LoRA of the same total rank; see `NOTES` for what each
    figure is. `model` is "tiny", "smollm2-135m" or a local folder, as for `load_backbone`."""
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
    k, r_p, r_g, r_u = adapters.num_experts, adapters.population_rank, adapters.group_rank, adapters.user_rank
    result = {
        "user_stage": bench.stage("user", peft_rank=r_p + k * r_g + r_u),
        "group_stage": bench.stage("group", peft_rank=r_p + k * r_g),
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
            "device": str(bench.device),
            "adapters": _jsonable(adapters.to_dict()),
            "constraint_weight": TrainConfig().constraint_weight,
        },
        "notes": NOTES,
    }
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

    def _fresh_backbone(self) -> Backbone:
        torch.manual_seed(0)
        return load_backbone(self.bcfg)

    def stage(self, stage: str, peft_rank: int) -> dict:
        log.info("bench %s stage: PROPER and a peft LoRA of rank %d", stage, peft_rank)
        proper, peft = self._proper(stage), self._peft(peft_rank)
        memory = {"proper": self._warm_up(proper), "peft": self._warm_up(peft)}
        times = self._time(proper, peft)
        p, q = statistics.median(times["proper"]), statistics.median(times["peft"])
        return {
            "proper_step_s": p,
            "peft_lora_step_s": q,
            "ratio": p / q,
            "proper_tokens_per_s": self.tokens / p,
            "peft_tokens_per_s": self.tokens / q,
            "proper_step_s_all": times["proper"],
            "peft_lora_step_s_all": times["peft"],
            "peft_lora_rank": peft_rank,
            "proper_trainable_params": proper.trainable_params,
            "peft_trainable_params": peft.trainable_params,
            "proper_memory": memory["proper"],
            "peft_memory": memory["peft"],
        }

    def _proper(self, stage: str) -> _Side:
        model = ProperModel(self._fresh_backbone(), self.adapters, seed=0)
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

    def _time(self, proper: _Side, peft: _Side) -> dict[str, list[float]]:
        """Alternate the two sides step by step (ABBA...), so that a change in the machine's load hits both."""
        times: dict[str, list[float]] = {"proper": [], "peft": []}
        for i in range(self.steps):
            order = [("proper", proper), ("peft", peft)]
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
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
