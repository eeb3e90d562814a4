"""fp16 weights with fp32 arithmetic on x86 CPUs (``quantization="fp16"``).

Decoding one token reads every weight once, so on a CPU its speed is bounded by bytes per token. FBGEMM's
fp16 GEMM keeps weights packed as fp16 and widens them to fp32 inside its kernel: half the bytes of fp32
with fp32 products and sums, and activations stay fp32 between layers. Each output row depends only on its
input row and the weights, so a prompt's tokens get the same values whether they are read in one prefill or
one at a time. Measured on the 2-core AVX2 machine of docs/benchmarks.md, for Gemma 3 270M's 262k x 640
output head: fp32 53 ms per token, bf16 20 ms, packed fp16 15.5 ms; eight rows at once 142 / 146 / 36 ms.

Embedding tables are kept as fp16 and widened on lookup (exactly: every fp16 is an fp32), so a tied
embedding and output head hold the same rounded values.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def available() -> bool:
    """Whether this torch build has FBGEMM (x86 CPUs); ARM and CUDA builds may not."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


class PackedLinearFP16(nn.Module):
    """An ``nn.Linear`` whose weight is packed fp16 for FBGEMM; inputs and outputs stay fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        self.nbytes = weight.numel() * 2 + (0 if bias is None else bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=fp16 (fbgemm)"


class EmbeddingFP16(nn.Module):
    """An ``nn.Embedding`` stored as fp16 and returned as fp32 (the subclass's scaling, if any, is kept)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.inner = embedding  # its weight becomes fp16 at the end of pack_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Gemma's scaled embedding multiplies by a normaliser cast to the weight dtype: do that part in fp32.
        scale = getattr(self.inner, "embed_scale", None)
        rows = nn.functional.embedding(input_ids, self.inner.weight).float()
        return rows if scale is None else rows * scale.float()


# A vision model's image encoder stays as loaded (fp32 on a CPU): it runs once per image, not per token.
VISION_PARTS = ("vision_tower", "multi_modal_projector")


def packed_linears(model: nn.Module, also: nn.Module | None = None) -> list[str]:
    """The names of the Linear layers (and ``also``) the packers replace: all but the image encoder's."""
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or module is also) and not any(part in name for part in VISION_PARTS)
    ]


def pack_model(model: nn.Module) -> int:
    """Replaces the model's Linear layers (output head included) and embeddings in place; returns the bytes
    of weights it now holds outside ordinary parameters (the packed ones), for memory accounting."""
    if not available():
        raise RuntimeError("quantization='fp16' needs a torch build with FBGEMM (x86 CPU)")
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    packed_bytes = 0
    done: dict[int, nn.Module] = {}  # a module reached under two names (tied) is replaced by one object
    # Walk by name and drop each fp32 Linear as soon as it is packed, so the load peaks near one copy.
    for name in packed_linears(model, embeddings):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, attribute)
        if id(child) not in done:
            done[id(child)] = PackedLinearFP16(child) if isinstance(child, nn.Linear) else EmbeddingFP16(child)
            packed_bytes += getattr(done[id(child)], "nbytes", 0)
        setattr(parent, attribute, done[id(child)])
        del child
    if head is not None and not isinstance(model.get_output_embeddings(), PackedLinearFP16):
        raise RuntimeError("the output head was not packed")
    model.float()  # norms and other small parameters in fp32 (the fp16 embedding table is kept below)
    embeddings.weight.data = embeddings.weight.data.half()
    # The loaded weights may be views of the memory-mapped checkpoint: copy what is left, so the mapping
    # (the fp32 weights now packed) is released instead of staying resident.
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.data = tensor.data.clone()
    return packed_bytes
