"""load_model: find the checkpoint, pick its family from its own config, quantize, build a ChatModel."""

from __future__ import annotations

import re
from pathlib import Path

from . import default_model, fp16_weights, mlx_backend
from .chat_model import ChatModel, ModelInfo
from .errors import ModelLoadError
from .registry import family_for
from .remote import PREFIX, RemoteChatModel

QUANTIZATIONS = ("auto", "nf4", "int8", "fp16", "none")
BACKENDS = ("transformers", "mlx", "auto")
MLX_PREFIX = "mlx:"  # a source written mlx:<folder> loads with the MLX backend (so the app's --model can pick it)
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MIN_CACHE_BYTES = 64 * 2**20


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return device


def _auto_quantization(device: str, dtype) -> str:
    """NF4 on CUDA; packed fp16 weights on an x86 CPU in float32 (half the bytes per token, fp32 sums)."""
    if device.startswith("cuda"):
        return "nf4"
    import torch

    if device == "cpu" and dtype in (None, "float32", "fp32", torch.float32) and fp16_weights.available():
        return "fp16"
    return "none"


def _resolve_dtype(dtype, device: str, quantization: str):
    import torch

    if dtype is None:
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # On CPU, 4-bit keeps its unquantized parts (embeddings, norms) in bf16 to stay small.
        return torch.bfloat16 if quantization == "nf4" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return getattr(torch, DTYPES[dtype.lower()])
    raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))} or a torch.dtype, not {dtype!r}")


def _locate(source, progress) -> tuple[str, str | None, str, str]:
    """(folder or repo id, gguf file name or None, display name, kind) for a source."""
    if source is None:
        return str(default_model.default_checkpoint(progress)), None, default_model.NAME, "embedded"
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be a path or a repo id, not {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a checkpoint folder or a .gguf file")
        return str(path.parent), path.name, path.stem, "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: it is not a transformers checkpoint folder")
        return str(path), None, path.name, "folder"
    if REPO_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return str(source), None, str(source), "hub"
    raise ModelLoadError(f"{source!r} is neither an existing file or folder nor a Hugging Face repo id")


def _apple_silicon() -> bool:
    import platform

    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _default_cache_bytes(device: str) -> int:
    import psutil
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free // 2
    else:
        budget = psutil.virtual_memory().available // 4
    return max(MIN_CACHE_BYTES, budget)


def _quantization_config(quantization: str, dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _explain(error: BaseException, name: str) -> str:
    text = str(error)
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return f"not enough memory to load {name}: try quantization='nf4' or a smaller model ({text.splitlines()[0]})"
    if type(error).__name__ == "SafetensorError" or "header" in text.lower() or "deserializ" in text.lower():
        return f"the weights of {name} are corrupt or truncated: {text.splitlines()[0] if text else error!r}"
    return f"could not load {name}: {type(error).__name__}: {text.splitlines()[0] if text else ''}"


def load_model(
    source=None,
    *,
    quantization="auto",
    device=None,
    dtype=None,
    max_cache_bytes=None,
    backend="transformers",
    progress=None,
) -> ChatModel:
    """Loads a Gemma 3 or Qwen 3 chat model.

    ``source``: None for the embedded default, a checkpoint folder, a ``.gguf`` file, a Hugging Face repo id,
    ``openai:<base-url>#<model>`` for a model on another OpenAI-compatible server, or ``mlx:<folder>``
    (the same as ``backend="mlx"``).
    ``progress(fraction, message)`` hears about the embedded model's one-time conversion.
    Raises ValueError for bad arguments and ModelLoadError when the model cannot be loaded.
    """
    if isinstance(source, str) and source.startswith(PREFIX):
        return RemoteChatModel(source)
    if isinstance(source, str) and source.startswith(MLX_PREFIX):
        source, backend = source[len(MLX_PREFIX) :], "mlx"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    if max_cache_bytes is not None and (
        isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes <= 0
    ):
        raise ValueError(f"max_cache_bytes must be a positive integer, not {max_cache_bytes!r}")
    if backend == "auto":
        backend = "mlx" if _apple_silicon() and mlx_backend.available() else "transformers"
    if backend == "mlx":
        folder, gguf_file, name, kind = _locate(source, progress)
        if gguf_file or kind == "hub":
            raise ModelLoadError("backend='mlx' loads a local checkpoint folder (e.g. an mlx-community download)")
        cache = max_cache_bytes or _default_cache_bytes("cpu")
        return mlx_backend.load_mlx(
            folder, name=name, source=kind if kind == "embedded" else folder, max_cache_bytes=cache
        )
    device = _resolve_device(device)
    if quantization == "auto":
        quantization = _auto_quantization(device, dtype)
    if quantization == "fp16" and (device != "cpu" or not fp16_weights.available()):
        raise ValueError("quantization='fp16' (packed fp16 weights) runs on x86 CPUs: use device='cpu'")
    torch_dtype = _resolve_dtype(dtype, device, quantization)
    import torch

    if quantization == "fp16" and torch_dtype != torch.float32:
        raise ValueError("quantization='fp16' computes in float32: leave dtype unset or pass 'float32'")
    folder, gguf_file, name, kind = _locate(source, progress)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(folder, **where)
    except OSError as e:
        if kind == "hub":
            raise ModelLoadError(
                f"could not fetch {source!r} from the Hugging Face Hub ({str(e).splitlines()[0]}). "
                "Without network access, download the checkpoint elsewhere and pass its local folder: "
                "load_model('/path/to/checkpoint')"
            ) from e
        raise ModelLoadError(_explain(e, name)) from e
    family = family_for(getattr(config, "model_type", None))

    quantization_config = _quantization_config(quantization, torch_dtype)
    kwargs = {"dtype": torch_dtype, **where}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else device
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **where)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if "device_map" not in kwargs and quantization_config is None:
            model.to(device)
    except Exception as e:  # any failure inside transformers is a load failure, explained by its cause
        raise ModelLoadError(_explain(e, name)) from e
    model.eval()
    parameters = _count_parameters(model)
    packed_bytes = fp16_weights.pack_model(model) if quantization == "fp16" else 0
    if not (tokenizer.chat_template or family.fallback_chat_template):
        raise ModelLoadError(f"{name} ships no chat template and its family ({family.name}) has no fallback")

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = ModelInfo(
        name=name,
        family=family.name,
        backend="transformers",
        quantization=quantization,
        device=str(next(model.parameters()).device),
        dtype=str(torch_dtype).removeprefix("torch."),
        parameters=parameters,
        memory_footprint_bytes=int(model.get_memory_footprint()) + packed_bytes,
        context_length=int(getattr(text_config, "max_position_embeddings", 0) or 8192),
        source=kind if kind in ("embedded", "hub") else folder if gguf_file is None else str(Path(folder) / gguf_file),
    )
    return ChatModel(model, tokenizer, family, info, max_cache_bytes=max_cache_bytes or _default_cache_bytes(device))


def _count_parameters(model) -> int:
    total = 0
    for parameter in model.parameters():
        # bitsandbytes packs two 4-bit weights per byte; its parameters report the packed count.
        packed = type(parameter).__name__ == "Params4bit"
        total += parameter.numel() * (2 if packed else 1)
    return total
