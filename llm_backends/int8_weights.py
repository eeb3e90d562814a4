"""int8 on CPUs (``quantization="int8"``): int8 weights with one fp32 scale per output channel, activations
rounded to int8 per block of 32 features as they come, exact integer products summed in fp32 per block, through
the ``linear`` kernel of ``cpu_kernels.py`` (whose rows never depend on each other).

A tied embedding table is read from the output head's int8 rows (so both hold the same rounded values, and
the table is stored once); an untied one is kept as fp16.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import cpu_kernels
from .fp16_weights import EmbeddingFP16, packed_linears

log = logging.getLogger(__name__)


def available() -> bool:
    return cpu_kernels.available()


class Int8Linear(nn.Module):
    """An ``nn.Linear`` whose weight is int8 with per-output-channel scales; inputs and outputs are fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, scale = cpu_kernels.ops().pack(linear.weight.detach().float())
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.ops().linear(x.float(), self.packed, self.scale, self.bias, self.in_features)

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized weight rows of the given output channels (fp32), shaped ids.shape + (in_features,)."""
        rows = cpu_kernels.ops().rows(self.packed, ids, self.in_features).float()
        rows = rows * self.scale[ids.reshape(-1)].unsqueeze(1)
        return rows.view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8 per channel"


class TiedEmbeddingInt8(nn.Module):
    """An embedding that shares its table with an ``Int8Linear`` output head (Gemma's scaling kept)."""

    def __init__(self, embedding: nn.Embedding, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list: not registered twice as a submodule
        self.embed_scale = getattr(embedding, "embed_scale", None)
        if self.embed_scale is not None:
            self.embed_scale = self.embed_scale.detach().float().clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.head[0].weight_rows(input_ids)
        return rows if self.embed_scale is None else rows * self.embed_scale


def pack_model(model: nn.Module) -> None:
    """Replaces the model's Linear layers (output head included) and its embedding table in place."""
    if not available():
        raise RuntimeError("quantization='int8' on a CPU needs its kernels, which could not be built here")
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    done: dict[int, nn.Module] = {}  # a module reached under two names is replaced by one object
    # Walk by name and drop each fp32 Linear as soon as it is packed, so the load peaks near one copy.
    for name in packed_linears(model):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, attribute)
        if id(child) not in done:
            done[id(child)] = Int8Linear(child)
        setattr(parent, attribute, done[id(child)])
        del child
    new_head = model.get_output_embeddings()
    if head is not None and not isinstance(new_head, Int8Linear):
        raise RuntimeError("the output head was not packed")
    replacement = TiedEmbeddingInt8(embeddings, new_head) if tied else EmbeddingFP16(embeddings)
    model.set_input_embeddings(replacement)
    cpu_kernels.fuse_norms(model)
    model.float()  # other small parameters in fp32
    if not tied:
        embeddings.weight.data = embeddings.weight.data.half()
    # The loaded weights may be views of the memory-mapped checkpoint: copy what is left, so the mapping
    # (the fp32 weights now packed) is released instead of staying resident.
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.data = tensor.data.clone()


_PACKAGE = Path(__file__).parent  # a stored model or cache depends on this code as much as on the checkpoint


def checkpoint_key(folder: str, gguf_file: str | None) -> str:
    """A hash of what a model's numbers depend on: the checkpoint's files (paths, sizes, times), this package's
    code and the torch and transformers versions."""
    import transformers

    root = Path(folder).resolve()
    files = (
        [root / gguf_file] if gguf_file else sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin"))
    )
    files += [root / "config.json"] if (root / "config.json").exists() else []
    key = hashlib.sha256()
    for path in files:
        stat = path.stat()
        key.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    for path in sorted(_PACKAGE.glob("*.py")) + sorted(_PACKAGE.glob("kernels/*")):
        key.update(path.read_bytes())
    key.update(f"{torch.__version__};{transformers.__version__}".encode())
    return key.hexdigest()


def store_path(folder: str, gguf_file: str | None) -> Path | None:
    """Where the packed form of the checkpoint in ``folder`` is kept (one file per checkpoint, in the user's
    cache folder), keyed by ``checkpoint_key``."""
    from .default_model import cache_root

    root = Path(folder).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name)[:60]
    return cache_root() / "packed" / f"{name}-{checkpoint_key(folder, gguf_file)[:20]}.int8.pt"


def load_stored(path: Path) -> nn.Module | None:
    """The packed model stored at ``path`` (memory-mapped: its weights are read, never copied), or None when
    there is none or it cannot be read (then it is removed, with a log line, and the caller packs anew).
    The file is a pickle: only files this code wrote in the user's own cache folder are ever opened."""
    if not path.exists():
        return None
    try:
        model = torch.load(path, mmap=True, weights_only=False)
        if not isinstance(model, nn.Module):
            raise TypeError(f"holds a {type(model).__name__}")
        return model.eval()
    except Exception as e:  # a damaged or outdated file is rebuilt, never trusted
        log.warning("ignoring the stored packed model %s (%s); packing the checkpoint again", path, e)
        path.unlink(missing_ok=True)
        return None


def store(model: nn.Module, path: Path) -> None:
    """Writes the packed model for the next load (atomically; other versions of the same checkpoint go)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # loading a pickle: nobody else may write here
        version = re.compile(re.escape(path.name.rsplit("-", 1)[0]) + r"-[0-9a-f]{20}\.int8\.pt")
        for old in path.parent.iterdir():
            if version.fullmatch(old.name):
                old.unlink(missing_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            try:
                torch.save(model, tmp)
            except BaseException:
                Path(tmp.name).unlink(missing_ok=True)
                raise
        os.replace(tmp.name, path)
    except Exception as e:  # no room or no permission: the next load packs again
        log.warning("could not store the packed model at %s (%s)", path, e)
