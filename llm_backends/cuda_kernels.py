"""Triton kernels for the CUDA decode step (``cuda_step.py``): writing new keys and values into the sessions' own
cache buffers, and attention over them, found through a table of pointers so that one captured CUDA graph
serves every step whatever buffers the sessions hold.

Attention computes each query token on its own: key blocks are aligned to absolute positions and visited in
the same order, whichever other tokens share the call and however a prompt was cut into pieces, so a token's
output is the same bitwise in a prefill and in a decode step (what the exact mode rests on).

A table row, per (layer, session): the keys' and values' addresses, the buffers' room (tokens per head), the
absolute position of buffer index 0, and the absolute position of the first key held (``META`` fields).
With ``TRITON_INTERPRET=1`` set before Triton is imported, its interpreter runs them on CPU tensors (slowly),
which is how the CPU suite tests them (tests/conftest.py sets it where there is no GPU).
"""

from __future__ import annotations

import torch

META = 5  # keys address, values address, room, position of index 0, first position held
BLOCK_KEYS = 32  # keys per block of the attention loop (blocks start at multiples of it, in absolute positions)


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def write_kv(
        keys, values, rows, positions, meta,
        stride_kh, stride_kt, stride_vh, stride_vt,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        token, head = tl.program_id(0), tl.program_id(1)
        row = tl.load(rows + token)
        entry = meta + row * 5
        room = tl.load(entry + 2)
        index = tl.load(positions + token) - tl.load(entry + 3)
        d = tl.arange(0, BLOCK_D)
        inside = d < HEAD_DIM
        k_out = tl.load(entry).to(tl.pointer_type(keys.dtype.element_ty))
        v_out = tl.load(entry + 1).to(tl.pointer_type(values.dtype.element_ty))
        place = (head * room + index) * HEAD_DIM + d
        k = tl.load(keys + head * stride_kh + token * stride_kt + d, mask=inside)
        v = tl.load(values + head * stride_vh + token * stride_vt + d, mask=inside)
        tl.store(k_out + place, k, mask=inside)
        tl.store(v_out + place, v, mask=inside)

    @triton.jit
    def attend(
        queries, out, rows, positions, meta, scale, window,
        stride_qh, stride_qt,
        HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        token, kv_head = tl.program_id(0), tl.program_id(1)
        row = tl.load(rows + token)
        entry = meta + row * 5
        room = tl.load(entry + 2)
        base = tl.load(entry + 3)
        position = tl.load(positions + token)
        low = tl.load(entry + 4)
        if window > 0:
            low = tl.maximum(low, position - window + 1)
        k_in = tl.load(entry).to(tl.pointer_type(queries.dtype.element_ty))
        v_in = tl.load(entry + 1).to(tl.pointer_type(queries.dtype.element_ty))
        k_in += kv_head * room * HEAD_DIM
        v_in += kv_head * room * HEAD_DIM

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + g
        q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        q = tl.load(queries + heads[:, None] * stride_qh + token * stride_qt + d[None, :], mask=q_mask, other=0.0)

        best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
        start = (low // BLOCK_N) * BLOCK_N
        for first in range(start, position + 1, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            held = (n >= low) & (n <= position)
            kv_mask = held[:, None] & (d[None, :] < HEAD_DIM)
            place = (n - base)[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(k_in + place, mask=kv_mask, other=0.0)
            v = tl.load(v_in + place, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(held[None, :], s * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            shrink = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * shrink + tl.sum(p, 1)
            if IEEE:
                acc = acc * shrink[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        result = acc / total[:, None]
        o_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        tl.store(out + token * HEADS * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :], result, mask=o_mask)

    @triton.jit
    def rms_norm(x, weight, out, eps, N: tl.constexpr, BLOCK: tl.constexpr, GEMMA: tl.constexpr):
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        inside = i < N
        v = tl.load(x + row * N + i, mask=inside, other=0.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(v * v, 0) / N + eps)
        w = tl.load(weight + i, mask=inside, other=0.0)
        if GEMMA:  # Gemma: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, then rounded once
            y = (v * scale * (1.0 + w.to(tl.float32))).to(out.dtype.element_ty)
        else:  # Qwen: rounded to the input's type, then times w in that type
            y = (w.to(tl.float32) * (v * scale).to(out.dtype.element_ty).to(tl.float32)).to(out.dtype.element_ty)
        tl.store(out + row * N + i, y, mask=inside)

    @triton.jit
    def rope(x, cos, sin, out, HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        token, head = tl.program_id(0), tl.program_id(1)
        i = tl.arange(0, BLOCK)
        inside = i < HALF
        at = (token * HEADS + head) * D
        kind = out.dtype.element_ty
        x1 = tl.load(x + at + i, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(x + at + HALF + i, mask=inside, other=0.0).to(tl.float32)
        c1 = tl.load(cos + token * D + i, mask=inside, other=0.0).to(tl.float32)
        c2 = tl.load(cos + token * D + HALF + i, mask=inside, other=0.0).to(tl.float32)
        s1 = tl.load(sin + token * D + i, mask=inside, other=0.0).to(tl.float32)
        s2 = tl.load(sin + token * D + HALF + i, mask=inside, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the tensors' type as torch's ops round it
        first = (x1 * c1).to(kind).to(tl.float32) + (-x2 * s1).to(kind).to(tl.float32)
        second = (x2 * c2).to(kind).to(tl.float32) + (x1 * s2).to(kind).to(tl.float32)
        tl.store(out + at + i, first.to(kind), mask=inside)
        tl.store(out + at + HALF + i, second.to(kind), mask=inside)

    return write_kv, attend, rms_norm, rope


_compiled = None


def _get():
    global _compiled
    if _compiled is None:
        _compiled = _kernels()
    return _compiled


def _next_power(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


def write_kv(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, meta) -> None:
    """Writes ``keys``/``values`` ([1, kv_heads, tokens, head_dim]) into the buffers ``meta`` ([rows, META]
    int64) names: token t of session ``rows[t]`` at buffer index ``positions[t]`` - that row's position of
    index 0."""
    _, heads, tokens, head_dim = keys.shape
    kernel = _get()[0]
    kernel[(tokens, heads)](
        keys, values, rows, positions, meta,
        keys.stride(1), keys.stride(2), values.stride(1), values.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=_next_power(head_dim, 16),
    )  # fmt: skip


def attend(
    queries: torch.Tensor, kv_heads: int, rows, positions, meta, scale: float, window: int | None
) -> torch.Tensor:
    """Attention of ``queries`` ([1, heads, tokens, head_dim]) over their sessions' keys and values (written
    before, ``write_kv``): token t sees the keys from max(first held, t's position - window + 1) to its own
    position. Returns [tokens, heads * head_dim] in the queries' dtype."""
    _, heads, tokens, head_dim = queries.shape
    group = heads // kv_heads
    out = torch.empty(tokens, heads * head_dim, dtype=queries.dtype, device=queries.device)
    kernel = _get()[1]
    kernel[(tokens, kv_heads)](
        queries, out, rows, positions, meta, float(scale), int(window or 0),
        queries.stride(1), queries.stride(2),
        HEADS=heads, GROUP=group, GROUP_PAD=_next_power(group, 16), HEAD_DIM=head_dim,
        BLOCK_D=_next_power(head_dim, 16), BLOCK_N=BLOCK_KEYS, IEEE=queries.dtype == torch.float32,
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` in one kernel (transformers' runs ~8), each row on its own (so a
    row's result never depends on the rows beside it): Gemma 3's form, x * rsqrt(mean(x^2) + eps) * (1 + w) in
    fp32, or Qwen 3's, w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty_like(x)
    _get()[2][(x.numel() // n,)](x, weight, out, float(eps), N=n, BLOCK=_next_power(n), GEMMA=gemma)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ([1, tokens, heads, head_dim]) by ``cos``/``sin`` ([1, tokens, head_dim], as
    transformers' rotary modules give them): x * cos + rotate_half(x) * sin in one kernel (transformers' takes
    ~5 per tensor), rounded as those ops round."""
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    _, tokens, heads, dim = x.shape
    out = torch.empty_like(x)
    half = dim // 2
    _get()[3][(tokens, heads)](x, cos, sin, out, HEADS=heads, D=dim, HALF=half, BLOCK=_next_power(half))
    return out
