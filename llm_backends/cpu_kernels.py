"""Small C++ kernels for CPU inference (``kernels/cpu_ops.cpp``), compiled once per machine on first use.

Each kernel computes a row of its output in a fixed order that does not depend on the other rows in the call
or on the thread count, so a prompt read at once, one token at a time, or in a batch with other sessions
gets bitwise the same values:

- ``linear``: int8 weights (one fp32 scale per output channel) times activations rounded to int8 per block
  of 32 features (one fp32 scale per block, as llama.cpp's Q8_0), exact integer products (AVX-512 VNNI where
  the CPU has it), summed in fp32 block by block. Decoding one token reads every weight once, so its speed is
  bounded by bytes per token (int8 reads half of fp16's); a batch of sessions is bounded by arithmetic, where
  4-byte integer products do four times the work of an fp32 FMA. Measured on the 2-core AVX-512 machine of
  docs/benchmarks.md for Gemma 3 270M's 262k x 640 output head: one row 5.0 ms (FBGEMM's packed fp16: 8.9
  ms), eight rows 6.3 ms (fp32 arithmetic on the same int8 weights: 17.7 ms). Built for AVX2 without VNNI
  (``-march=x86-64-v3`` on the same machine) the same integers take 6.5 ms for one row and 51 ms for eight.
- ``rms_norm``: one call where transformers' RMSNorm runs about ten small ops; a decode step of Gemma 3 270M
  runs 109 norms.

Built with the machine's own vector instructions (``-march=native``) by torch's extension loader.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / "cpu_ops.cpp", KERNELS / "decode_step.cpp"]


@functools.cache
def ops():
    """The compiled module, or None where it cannot be built here (no C++ compiler or headers)."""
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the CPU kernels (built on first use on a machine: about 30 s once)")
        # Built for this CPU's instructions: the name carries them, so a cache folder shared with another
        # kind of CPU builds its own copy instead of loading one that would stop on an illegal instruction.
        # (torch rebuilds when a source changes; the name also carries the header, which it does not watch.)
        return load(
            name=f"llm_chat_cpu_ops_{_cpu_signature()}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler: the callers fall back to other precisions
        log.warning("the CPU kernels could not be built (%s); int8 weights are unavailable", e)
        return None


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    header = (KERNELS / "cpu_ops.h").read_bytes().hex()
    text = f"{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}|{flags}|{header}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def available() -> bool:
    return ops() is not None


def _built_for(values: torch.Tensor, dim: int):
    """The compiled module where a model already built it (never starts a build: an MLX model on a Mac has no use
    for one) and ``values`` is a ``dim``-dimensional fp32 CPU tensor; else None."""
    built = ops.cache_info().currsize > 0
    usable = built and values.device.type == "cpu" and values.dtype == torch.float32 and values.dim() == dim
    return ops() if usable else None


def argmax(values: torch.Tensor) -> int:
    """torch.argmax of a 1-D tensor; on a CPU in fp32 by the kernel where a model already built it (two vector
    passes, no threads of its own): a reply's first greedy token, and every one where no shared pass picked it
    (``argmax_rows`` picks those of a pass at once)."""
    ops_ = _built_for(values, 1)
    if ops_ is None or values.numel() == 0:
        return int(values.argmax())
    return ops_.argmax(values.contiguous())


def argmax_rows(values: torch.Tensor) -> list[int]:
    """torch.argmax(values, -1) of a 2-D tensor, as ints: on a CPU in fp32 one kernel call for all rows (a shared
    step's greedy picks), elsewhere torch's."""
    ops_ = _built_for(values, 2)
    if ops_ is None or values.shape[1] == 0:
        return values.float().argmax(-1).tolist()
    return ops_.argmax_rows(values).tolist()


def topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(values, k) of a 1-D tensor: the k largest values and their indices, largest first. On a CPU in
    fp32 by the kernel where a model already built it (one vector pass, no threads of its own; equal values in
    index order), elsewhere, or where a value is NaN, torch's."""
    ops_ = _built_for(values, 1)
    if ops_ is not None and 0 < k <= values.numel():
        found, where = ops_.topk(values.contiguous(), k)
        if found.numel():
            return found, where
    return torch.topk(values, k)


class FusedRMSNorm(nn.Module):
    """Stands in for a model's RMSNorm: x / sqrt(mean(x^2) + eps) * (offset + weight), in fp32."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.eps, self.offset = float(eps), float(offset)
        # offset + weight once here, not on every call (a decode step runs ~100 norms)
        self.register_buffer("gain", (self.weight.data + self.offset).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops().rms_norm(x.float(), self.gain, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, offset={self.offset}"


def _as_fused(module: nn.Module) -> FusedRMSNorm | None:
    """The fused form of an RMSNorm module, found by checking its output against both usual formulas
    (Gemma scales by 1 + weight, Llama and Qwen by weight); None for anything else."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    probe = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(probe.to(weight.dtype)).float()
        for offset in (0.0, 1.0):
            fused = FusedRMSNorm(weight, eps, offset)
            if torch.allclose(fused(probe), expected, rtol=1e-3, atol=1e-4):
                return fused
    return None


def fuse_norms(model: nn.Module) -> int:
    """Replaces the model's RMSNorm modules with ``FusedRMSNorm`` in place; returns how many it replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        fused = _as_fused(module)
        if fused is None:
            log.warning("%s (%s) is not a plain RMS norm; it is left as it is", name, type(module).__name__)
            continue
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, fused)
        replaced += 1
    return replaced
