"""The transformers backend: load a checkpoint (device, dtype, quantization) and run it over cache entries."""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch

from . import fp16_weights, int8_weights, kv_layers
from . import images as image_tokens
from .backend import ModelInfo
from .batching import NO_ARRIVAL, Arrival, DecodeBatcher, FairLock, RowCaches, RowsIntact, use_row_attention
from .cuda_step import CudaStep
from .decode_step import DecodeStep
from .disk_tier import DiskTier
from .engine import SHARED_CHUNK
from .errors import ModelLoadError
from .host_tier import HostTier
from .loading import LoadOptions, default_cache_bytes, default_host_cache_bytes, local_label, locate
from .local import FALLBACK_CONTEXT, LocalModel, restore_points
from .registry import family_for
from .session_cache import CacheEntry

# On a CPU these precisions replace the model's Linear layers after loading (float32 activations).
CPU_PACKED = {"fp16": fp16_weights, "int8": int8_weights}

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


# The longest piece of a prompt that is read in a shared pass with other sessions' decode steps (through the C++
# step; longer pieces run transformers' forward under the compute lock, whose attention is faster over many
# tokens). While others decode, prompts are read in pieces of SHARED_CHUNK, so all of them ride along.
RIDE_ALONG = SHARED_CHUNK


class TorchRunner:
    """Feeds tokens into a transformers causal LM (or image-text-to-text model: ``processor`` prepares its
    images); concurrent sessions' decode steps share one forward pass."""

    def __init__(self, model, *, max_checkpoints: int, max_batch: int = 16, processor=None, exact: bool = False):
        self.model = model
        self.processor = processor
        self.max_checkpoints = max_checkpoints
        self.device = next(model.parameters()).device
        # One forward at a time: concurrent prefills and decode batches would only fight over the cores. Taken in
        # turn, so a decode step waits for at most one piece of a prefill.
        self.compute = FairLock()
        batched = max_batch > 1 and use_row_attention(model)
        self.batcher = DecodeBatcher(self.feed_rows, max_batch) if batched else None
        # Decode steps skip transformers' per-call machinery where the architecture is one it knows; on CUDA
        # they are captured as graphs (cuda_step.py), which in the exact mode also read the prompts.
        self.exact = exact and self.device.type == "cuda"  # a CPU's kernels are row-invariant already
        self.step = None
        if batched and self.device.type == "cuda":
            self.step = CudaStep.for_model(model, exact=exact)
            if self.step is not None:
                self.step.capture_all()  # before serving: a capture must not meet other threads' first steps
        if batched and self.step is None and not self.exact:
            self.step = DecodeStep.for_model(model)
        if self.exact and self.step is None:
            raise ValueError("exact=True on CUDA needs a Gemma 3 or Qwen 3 text decoder and Triton")

    def new_entry(self) -> CacheEntry:
        config = self.model.config
        return CacheEntry(
            make_cache=lambda: kv_layers.new_cache(config),
            max_checkpoints=self.max_checkpoints,
            copy_cache=kv_layers.copy_cache,
            clone_windows=kv_layers.clone_windows,
        )

    @torch.inference_mode()
    def forward(
        self, entry: CacheEntry, tokens: Sequence[int], *, logits: bool = True, images: Mapping | None = None
    ) -> torch.Tensor | None:
        """Feeds ``tokens`` after what the cache holds; returns the last position's logits (None with
        ``logits=False``: the decoder alone runs, not the output head). Image tokens (pseudo ids) are read
        from ``images``, each image's run whole in this call.

        The ledger grows only once the model has run; a failure mid-forward leaves the cache in an unknown
        state, so the entry is reset rather than trusted.
        """
        if self._rides_along(tokens):
            return self.batcher.step(entry, tokens, logits=logits, decode=False)[0]
        if self.batcher is not None:
            self.batcher.arrived(entry)  # this piece goes alone: the others' passes need not wait for it
        if self.exact:
            return self._exact_forward(entry, tokens, logits)
        model = self.model if logits else self.model.base_model
        extra = {"logits_to_keep": 1} if logits else {}
        if any(t < 0 for t in tokens):
            extra.update(self._image_inputs(len(entry.ids), tokens, images or {}))
            tokens_in = [self.model.config.image_token_id if t < 0 else t for t in tokens]
        else:
            tokens_in = tokens
        input_ids = torch.tensor([list(tokens_in)], dtype=torch.long, device=self.device)
        try:
            with self.compute:
                out = model(input_ids=input_ids, past_key_values=entry.cache, use_cache=True, **extra)
        except BaseException:
            entry.reset()
            raise
        entry.ids.extend(tokens)
        return out.logits[0, -1] if logits else None

    def _exact_forward(self, entry: CacheEntry, tokens: Sequence[int], logits: bool) -> torch.Tensor | None:
        """A prompt piece read by the exact mode's step (tile by tile), so its keys and values are bitwise those a
        decode step would write; the step changes no cache when it fails."""
        if any(t < 0 for t in tokens):
            raise ValueError("exact mode reads text only: send images with exact=False")
        with self.compute:
            out = self.step.feed([entry.cache], [list(tokens)], [len(entry.ids)], [0] if logits else [])
        entry.ids.extend(tokens)
        return out[0] if logits else None

    def _image_inputs(self, offset: int, tokens: Sequence[int], images: Mapping) -> dict:
        """``pixel_values`` for the images that begin in ``tokens`` and ``token_type_ids`` marking image tokens.
        The latter run from the sequence's start (the mask reads them by absolute position); images already
        in the cache are marked as text, since no token of this call attends within them."""
        starts = [image_tokens.key_of(t) for t in tokens if t < 0 and image_tokens.place(t) == 0]
        if self.processor is None or any(key not in images for key in starts):
            raise ValueError("the prompt holds image tokens that no image of the request names")
        pictures = [images[key].pixels for key in starts]
        pixels = self.processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        types = torch.zeros((1, offset + len(tokens)), dtype=torch.long, device=self.device)
        types[0, offset:] = torch.tensor([int(t < 0) for t in tokens], device=self.device)
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        return {"pixel_values": pixels.to(self.device, dtype), "token_type_ids": types}

    def _rides_along(self, tokens: Sequence[int]) -> bool:
        """Whether a piece of a prompt goes through the decode batcher (the C++ step reads several tokens per
        session): short pieces without images, which then share a pass with other sessions' next tokens
        instead of waiting for the lock, and skip transformers' per-call work (~30 ms on 2 cores)."""
        native = self.batcher is not None and self.step is not None and self.step.native is not None
        return native and 0 < len(tokens) <= RIDE_ALONG and min(tokens) >= 0

    def forward_rows(self, entries: Sequence[CacheEntry], tokens: Sequence[int]) -> torch.Tensor:
        """One token for each of several sessions in one forward pass; returns their logits, one row each."""
        return self.feed_rows(entries, [[t] for t in tokens], range(len(tokens)))

    @torch.inference_mode()
    def feed_rows(
        self, entries: Sequence[CacheEntry], pieces: Sequence[Sequence[int]], wanted: Sequence[int]
    ) -> torch.Tensor:
        """``pieces[i]`` into ``entries[i]``, all in one forward pass; returns the logits of the last token of the
        entries in ``wanted`` (indices), one row each. Pieces of more than one token need the C++ step.

        Every row keeps its own cache and position: the linear layers see a batch, attention runs per row
        over that row's cache. If the C++ step fails, no cache has changed (RowsIntact: the batcher retries the
        rows one by one); if another step fails, every entry in it is reset (its cache state is unknown).
        """
        caches, positions = [e.cache for e in entries], [len(e.ids) for e in entries]
        if self.step is not None and self.step.native is not None:
            try:
                with self.compute:
                    logits = self.step.feed(caches, pieces, positions, wanted)
            except Exception as e:  # the C++ step changed no cache (see RowsIntact)
                raise RowsIntact(str(e)) from e
            for entry, piece in zip(entries, pieces, strict=True):
                entry.ids.extend(piece)
            return logits
        if any(len(piece) != 1 for piece in pieces):
            raise ValueError("pieces of several tokens need the C++ step")
        tokens = [piece[0] for piece in pieces]
        try:
            with self.compute:
                if self.step is not None:
                    logits = self.step(caches, tokens, positions)[list(wanted)]
                else:
                    logits = self._forward_rows(entries, tokens)[list(wanted)]
        except BaseException:
            for entry in entries:
                entry.reset()
            raise
        for entry, piece in zip(entries, pieces, strict=True):
            entry.ids.extend(piece)
        return logits

    def _forward_rows(self, entries: Sequence[CacheEntry], tokens: Sequence[int]) -> torch.Tensor:
        """transformers' own forward over the rows, for architectures ``DecodeStep`` does not know."""
        input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(e.ids)] for e in entries], dtype=torch.long, device=self.device)
        masks = dict.fromkeys(set(getattr(self.model.config.get_text_config(), "layer_types", None) or ()), None)
        masks.setdefault("full_attention", None)
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=masks,
            past_key_values=RowCaches([e.cache for e in entries]),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def decode(self, entry: CacheEntry, token: int, *, greedy: bool = False) -> tuple[torch.Tensor, int | None]:
        if self.batcher is None:
            return self.forward(entry, [token]), None
        return self.batcher.step(entry, [token], greedy=greedy)

    def decoding(self):
        return nullcontext() if self.batcher is None else self.batcher.decoding()

    def arrival(self) -> Arrival:
        # Waited for only where a prompt's first piece can join the others' pass: the C++ step on a CPU. (On a
        # GPU a pass takes a few ms, and what waiting there costs the decoding sessions is not measured.)
        joins = self.device.type == "cpu" and self.batcher is not None and getattr(self.step, "native", None)
        return self.batcher.arrive() if joins else NO_ARRIVAL

    def others_decoding(self) -> bool:
        return self.batcher is not None and self.batcher.sessions_decoding > 0


def label(target: str | None) -> str:
    return local_label(target)


def cache_identity(checkpoint: str, quantization: str, dtype, device: str, exact: bool) -> str:
    """What a session's saved states depend on (the disk tier loads only files of the same identity): the
    checkpoint, code and library versions (``checkpoint``), the precision and the device, and on CUDA the mode
    and the GPUs, CUDA and Triton, whose kernels round differently (a cache from the fast kernels would break the
    exact mode's promise)."""
    parts = [checkpoint, quantization, str(dtype), device]
    if device.startswith("cuda"):
        cuda = torch.cuda
        gpus = [f"{cuda.get_device_name(i)}:{cuda.get_device_capability(i)}" for i in range(cuda.device_count())]
        parts += [f"exact={exact}", ",".join(gpus), f"cuda={torch.version.cuda}", f"triton={_version('triton')}"]
    return "|".join(parts)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load(target: str | None, options: LoadOptions) -> LocalModel:
    """Loads a local checkpoint folder, .gguf file or Hub repo id (None: the embedded model)."""
    device = _resolve_device(options.device)
    quantization = options.quantization
    if quantization == "auto":
        quantization = _auto_quantization(device, options.dtype)
    if quantization == "fp16" and (device != "cpu" or not fp16_weights.available()):
        raise ValueError("quantization='fp16' (packed fp16 weights) runs on x86 CPUs: use device='cpu'")
    if quantization == "int8" and device == "cpu" and not int8_weights.available():
        raise ValueError("quantization='int8' on a CPU needs a C++ compiler to build its kernel (see the log)")
    dtype = _resolve_dtype(options.dtype, device, quantization)
    if quantization in CPU_PACKED and device == "cpu" and dtype != torch.float32:
        raise ValueError(f"quantization={quantization!r} computes in float32: leave dtype unset or pass 'float32'")
    where = locate(target, options.progress)
    tier = None
    if options.cache_dir is not None:  # before the weights: an unusable folder is said at once
        checkpoint = int8_weights.checkpoint_key(where.folder, where.gguf_file)
        identity = cache_identity(checkpoint, quantization, dtype, device, options.exact)
        tier = DiskTier(options.cache_dir, identity, options.disk_cache_bytes)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    gguf = {"gguf_file": where.gguf_file} if where.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(where.folder, **gguf)
    except OSError as e:
        if where.kind == "hub":
            raise ModelLoadError(
                f"could not fetch {target!r} from the Hugging Face Hub ({str(e).splitlines()[0]}). "
                "Without network access, download the checkpoint elsewhere and pass its local folder: "
                "load_model('/path/to/checkpoint')"
            ) from e
        raise ModelLoadError(_explain(e, where.name)) from e
    family = family_for(getattr(config, "model_type", None))
    # Gemma 3 from 4B up reads images: loaded as image-text-to-text with its processor (a GGUF holds the text
    # decoder only).
    vision = getattr(config, "vision_config", None) is not None and not where.gguf_file

    cpu_packed = device == "cpu" and quantization in CPU_PACKED
    quantization_config = None if cpu_packed else _quantization_config(quantization, dtype, vision)
    kwargs = {"dtype": dtype, **gguf}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else device
    # int8 weights are stored once packed, so later loads map them instead of reading and packing fp32.
    stored = int8_weights.store_path(where.folder, where.gguf_file) if cpu_packed and quantization == "int8" else None
    model = int8_weights.load_stored(stored) if stored else None
    processor = None
    try:
        if vision:
            processor = AutoProcessor.from_pretrained(where.folder)
            tokenizer = processor.tokenizer
            tokenizer.chat_template = tokenizer.chat_template or processor.chat_template
        else:
            tokenizer = AutoTokenizer.from_pretrained(where.folder, **gguf)
        if model is None:
            model_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
            model = model_class.from_pretrained(where.folder, **kwargs)
            if "device_map" not in kwargs and quantization_config is None:
                model.to(device)
    except Exception as e:  # any failure inside transformers is a load failure, explained by its cause
        raise ModelLoadError(_explain(e, where.name)) from e
    model.eval()
    packed_bytes = 0
    if not hasattr(model, "llm_chat_parameters"):  # not a stored packed model
        model.llm_chat_parameters = _count_parameters(model)
        if cpu_packed:
            packed_bytes = CPU_PACKED[quantization].pack_model(model) or 0
            if stored:
                int8_weights.store(model, stored)
    parameters = model.llm_chat_parameters
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = ModelInfo(
        name=where.name,
        family=family.name,
        backend="transformers",
        source=where.source,
        device=str(next(model.parameters()).device),
        quantization=quantization,
        dtype=str(dtype).removeprefix("torch."),
        parameters=parameters,
        memory_footprint_bytes=int(model.get_memory_footprint()) + packed_bytes,
        context_length=int(getattr(text_config, "max_position_embeddings", 0) or FALLBACK_CONTEXT),
    )
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    host_bytes = options.host_cache_bytes
    if host_bytes is None:
        host_bytes = default_host_cache_bytes(device)
    return LocalModel(
        tokenizer,
        family,
        info,
        TorchRunner(
            model, max_checkpoints=restore_points(options.restore_turns), processor=processor, exact=options.exact
        ),
        max_cache_bytes=options.max_cache_bytes or default_cache_bytes(device),
        vocab_size=int(text_config.vocab_size),
        eos_ids=eos if isinstance(eos, list) else [eos],
        model=model,
        disk_tier=tier,
        host_tier=HostTier(host_bytes) if host_bytes else None,
        image_format=image_tokens.ImageFormat.of(processor) if processor is not None else None,
    )


def _resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return device


def _auto_quantization(device: str, dtype) -> str:
    """NF4 on CUDA. On a CPU in float32, int8 (a quarter of fp32's bytes per token, int8 activations per block)
    where its kernel builds, else packed fp16 on x86."""
    if device.startswith("cuda"):
        return "nf4"
    if device == "cpu" and dtype in (None, "float32", "fp32", torch.float32):
        if int8_weights.available():
            return "int8"
        if fp16_weights.available():
            return "fp16"
    return "none"


def _resolve_dtype(dtype, device: str, quantization: str):
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


def _quantization_config(quantization: str, dtype, vision: bool = False):
    from transformers import BitsAndBytesConfig

    # A vision model's image encoder stays in the compute dtype (bf16 on GPUs), the known-good setting for
    # Gemma 3; the output head is left as transformers leaves it by default.
    # Patterns match module names from their start (transformers' should_convert_module), hence the ".*".
    skip = {"llm_int8_skip_modules": [*(f".*{part}" for part in fp16_weights.VISION_PARTS), "lm_head"]}
    skip = skip if vision else {}
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            **skip,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return None


def _explain(error: BaseException, name: str) -> str:
    text = str(error)
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return f"not enough memory to load {name}: try quantization='nf4' or a smaller model ({text.splitlines()[0]})"
    if type(error).__name__ == "SafetensorError" or "header" in text.lower() or "deserializ" in text.lower():
        return f"the weights of {name} are corrupt or truncated: {text.splitlines()[0] if text else error!r}"
    return f"could not load {name}: {type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _count_parameters(model) -> int:
    total = 0
    for parameter in model.parameters():
        # bitsandbytes packs two 4-bit weights per byte; its parameters report the packed count.
        packed = type(parameter).__name__ == "Params4bit"
        total += parameter.numel() * (2 if packed else 1)
    return total
