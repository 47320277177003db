"""Decode attention: one triton launch for one query token against the KV cache (grouped-query aware).

transformers' SDPA path, compiled for a decode step with a static cache, spends about 10 us a layer on an
H100: it repeats K and V to every query head (two copies of the cache), lays the query out for cuDNN,
runs cuDNN's attention and transposes the result back (docs/kernels.md). Here one launch reads
the cache in place: the query heads that share a K/V head are one tile (``tl.dot`` against each block of
keys), the cache length is split across programs (flash-decoding) and the last program of each head,
found with a ticket counter, merges the partial softmaxes and writes ``[B, 1, H, D]``, the layout
transformers wants back.

It is registered as the attention implementation ``"wina_sdpa"`` (``enable``): one-token steps on CUDA
take the kernel, everything else (prompts, CPU, softcap, sinks, dropout, unusual masks) goes to
transformers' own ``sdpa_attention_forward`` with the same mask, so the numbers are SDPA's there.
Gemma 3's scale and sliding-window layers take the kernel too (``kernel_takes`` says on what terms).
"""

from __future__ import annotations

import math

import torch

from . import backend
from .backend import tl, triton
from .configs import Config
from .launch import cdiv, launch_kernel

__all__ = ["decode_attention", "reference_decode_attention", "supported", "kernel_takes", "enable", "IMPLEMENTATION"]

IMPLEMENTATION = "wina_sdpa"
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MAX_GROUP = 64


def reference_decode_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """Float32 attention of ``q [B, H, 1, D]`` over ``k, v [B, Hkv, L, D]``: ``[B, 1, H, D]`` in q's dtype.

    ``mask`` ``[B|1, 1, 1, L]``: boolean (True attends) or additive float. A query with no key to attend
    gets zeros."""
    B, H, _, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale  # [B, H, 1, L]
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2).to(q.dtype)


if backend.HAS_TRITON:

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, cnt_ptr,
        L, HKV, SPLIT_LEN, N_SPLITS, qk_scale,
        s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_mb, s_ml, s_ob, s_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_L: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)  # b * HKV + kv head
        sid = tl.program_id(1)  # which slice of the cache
        b = pid // HKV
        h = pid % HKV
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b * s_qb + (h * GROUP + offs_g)[:, None] * s_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        start = sid * SPLIT_LEN
        for l0 in range(start, start + SPLIT_LEN, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            valid = offs_l < L
            if MASK_KIND == 1:  # boolean: attend where set
                mk = tl.load(m_ptr + b * s_mb + offs_l * s_ml, mask=valid, other=0)
                valid = valid & (mk != 0)
            # masked-off positions issue no loads: only the filled part of a static cache is read. V is
            # requested with K, so both are in flight together
            kt = tl.load(k_base + offs_l[None, :] * s_kl + offs_d[:, None], mask=valid[None, :] & d_mask[:, None],
                         other=0.0)
            v = tl.load(v_base + offs_l[:, None] * s_vl + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                        other=0.0)
            s = tl.dot(q, kt) * qk_scale  # [BLOCK_G, BLOCK_L], log2 units
            if MASK_KIND == 2:  # additive
                s += tl.load(m_ptr + b * s_mb + offs_l * s_ml, mask=valid, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o_offs = b * s_ob + (h * GROUP + offs_g)[:, None] * s_oh + offs_d[None, :]
        o_mask = g_mask[:, None] & d_mask[None, :]
        if SPLIT:
            # this program's (acc, max, sum) to the workspace; the last program of the head merges them.
            # Layout per head: acc [N_SPLITS, BLOCK_G, BLOCK_D], then max and sum [N_SPLITS, BLOCK_G] each
            head = ws_ptr + pid * N_SPLITS * BLOCK_G * (BLOCK_D + 2)
            m_base = head + N_SPLITS * BLOCK_G * BLOCK_D
            l_base = m_base + N_SPLITS * BLOCK_G
            tile = offs_g[:, None] * BLOCK_D + offs_d[None, :]
            tl.store(head + sid * BLOCK_G * BLOCK_D + tile, acc)
            tl.store(m_base + sid * BLOCK_G + offs_g, m_i)
            tl.store(l_base + sid * BLOCK_G + offs_g, l_i)
            # every thread's stores happen before the ticket, whose release makes them visible to the merger
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if ticket == N_SPLITS - 1:
                offs_s = tl.arange(0, BLOCK_S)
                rows = offs_s[:, None] * BLOCK_G + offs_g[None, :]
                s_mask = (offs_s < N_SPLITS)[:, None]
                ms = tl.load(m_base + rows, mask=s_mask, other=float("-inf"), cache_modifier=".cg")  # [BLOCK_S, BLOCK_G]
                ls = tl.load(l_base + rows, mask=s_mask, other=0.0, cache_modifier=".cg")
                m_all = tl.max(ms, axis=0)
                w = tl.exp2(ms - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
                l_all = tl.sum(w * ls, axis=0)
                a_all = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                for j in tl.static_range(BLOCK_S):  # unrolled: the partial tiles are all requested at once
                    wj = tl.sum(tl.where(offs_s[:, None] == j, w, 0.0), axis=0)
                    a_all += wj[:, None] * tl.load(head + j * BLOCK_G * BLOCK_D + tile, mask=(j < N_SPLITS) & g_mask[:, None],
                                                   other=0.0, cache_modifier=".cg")
                out = tl.where(l_all[:, None] > 0, a_all / l_all[:, None], 0.0)
                tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
                tl.store(cnt_ptr + pid, 0)
        else:
            out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
            tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=o_mask)


# Launch shape, from two sweeps on an H100 (docs/kernels.md; Llama-3-8B heads, CUDA-graph timings):
# keys per block (64 up to 512 cached positions, else 128), the programs to aim for when splitting the
# cache, at most MAX_SPLITS slices per head, no software pipelining. 4.9 us at 161 cached positions, 5.5 at
# 512, 6.6 at 1024 and 11.5 at 4096; repeat_kv + SDPA takes 15, 25, 34 and 110 us
# (benchmarks/results/attention_defaults_h100.txt).
BLOCK_L = None
TARGET_PROGRAMS = 132
MAX_SPLITS = 16
_CFG = Config(num_warps=4, num_stages=1)
_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed per-head ticket counters (every launch leaves them zeroed); ``None`` while a CUDA graph is
    being captured and the buffer would have to grow (the launch then runs unsplit)."""
    key = (device.type, device.index)
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        cnt = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = cnt
    return cnt


def _mask_kind(mask: torch.Tensor | None) -> int:
    if mask is None:
        return 0
    return 1 if mask.dtype == torch.bool else 2


def supported(query, key, value, mask=None) -> bool:
    """Whether the kernel computes this call: one query position, CUDA + triton, fp16/bf16, head dim <= 256,
    a mask of ``[B|1, 1, 1, L]`` (or none)."""
    if not (backend.HAS_TRITON and query.is_cuda and query.dim() == 4 and key.dim() == 4 and query.shape[2] == 1):
        return False
    B, H, _, D = query.shape
    if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if key.shape != value.shape or key.shape[0] != B or key.shape[-1] != D or D > _MAX_HEAD_DIM:
        return False
    if H % key.shape[1] or H // key.shape[1] > _MAX_GROUP or key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    if mask is not None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != key.shape[2]:
            return False
        if mask.shape[0] not in (1, B) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            return False
    return True


def _launch(q, k, v, mask, scale, out):
    B, H, _, D = q.shape
    hkv, L = k.shape[1], k.shape[2]
    group = H // hkv
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(D))
    block_l = BLOCK_L or (64 if L <= 512 else 128)
    n_blocks = cdiv(L, block_l)
    want = min(MAX_SPLITS, max(1, TARGET_PROGRAMS // (B * hkv)))
    per = cdiv(n_blocks, want)
    n_splits = cdiv(n_blocks, per)
    cnt = _counters(q.device, B * hkv) if n_splits > 1 else None
    if cnt is None:
        per, n_splits = n_blocks, 1
    ws = torch.empty(B * hkv * n_splits * block_g * (block_d + 2) if n_splits > 1 else 1, dtype=torch.float32,
                     device=q.device)
    kind = _mask_kind(mask)
    m = mask if mask is not None else out
    s_mb = (m.stride(0) if m.shape[0] > 1 else 0) if mask is not None else 0
    s_ml = m.stride(-1) if mask is not None else 0
    if kind == 1:
        m = m.view(torch.uint8)  # same strides
    launch_kernel(
        _decode_attn_kernel, (B * hkv, n_splits, 1),
        [q, k, v, m, out, ws, cnt if cnt is not None else ws,
         L, hkv, per * block_l, n_splits, float(scale * _LOG2E),
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
         s_mb, s_ml, out.stride(0), out.stride(2)],
        dict(GROUP=group, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_L=block_l, MASK_KIND=kind,
             SPLIT=n_splits > 1, BLOCK_S=triton.next_power_of_2(n_splits)),
        _CFG, q.device,
    )


def decode_attention(query, key, value, mask=None, scale=None) -> torch.Tensor:
    """Attention of one query position, ``query [B, H, 1, D]`` over ``key, value [B, Hkv, L, D]``, returned as
    ``[B, 1, H, D]``. The kernel where ``supported``, else ``reference_decode_attention``."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if not supported(query, key, value, mask):
        return reference_decode_attention(query, key, value, mask, scale)
    B, H, _, D = query.shape
    out = torch.empty((B, 1, H, D), dtype=query.dtype, device=query.device)
    _launch(query, key, value, mask, scale, out)
    return out


def _register_op():
    """``torch.ops.wina.decode_attention``: opaque to ``torch.compile`` (see ``launch.py``, ``_register_op``)."""
    try:
        from torch.library import custom_op

        def _run(query, key, value, mask, scale):
            return decode_attention(query, key, value, mask, scale)

        op = custom_op("wina::decode_attention", _run, mutates_args=(),
                       schema="(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")

        @op.register_fake
        def _(query, key, value, mask, scale):
            B, H, _, D = query.shape
            return query.new_empty((B, 1, H, D))

        return op
    except Exception:  # pragma: no cover - torch < 2.4, or an API that changed
        return None


_OP = _register_op()


def kernel_takes(query, key, value, attention_mask, dropout: float = 0.0, **kwargs) -> bool:
    """Whether a call of transformers' attention interface runs the kernel (else SDPA runs it).

    The kernel computes ``softmax(q k^T * scaling + mask) v`` and nothing else, so anything more goes to
    SDPA: dropout, soft-capping, attention sinks, position biases, returned weights. Two inputs need a
    word because Gemma 3 passes them:

    * ``scaling``: the module's own scale (``query_pre_attn_scalar ** -0.5`` for Gemma, not
      ``head_dim ** -0.5``) is passed through to the kernel as it is; it is never recomputed here.
    * ``sliding_window``: the kernel has no window of its own. It attends to exactly the keys the mask
      lets through, and transformers' mask of a sliding-window layer is the window (``sdpa_mask`` with
      the layer's window; a sliding-window cache layer holds the last ``window`` keys). So a
      sliding-window layer takes the kernel only with that mask, or when all its keys are inside the
      window; a mask-less call over more keys than the window goes to SDPA, as transformers would run it.
    """
    plain = (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
             and kwargs.get("sinks") is None and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions", False) and kwargs.get("cache") is None)
    window = kwargs.get("sliding_window")
    if window is not None and attention_mask is None and key.shape[-2] > window:
        return False
    return plain and supported(query, key, value, attention_mask)


def _attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' attention interface: the kernel for one-token steps (``kernel_takes``), SDPA for
    everything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kernel_takes(query, key, value, attention_mask, dropout, **kwargs):
        scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
        if _OP is not None and torch.compiler.is_compiling():
            return _OP(query, key, value, attention_mask, scale), None
        return decode_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def enable(model) -> bool:
    """Switch a transformers model that uses SDPA to ``"wina_sdpa"``: SDPA's masks and prompt path, this
    kernel for decode steps. Returns whether the model now uses it."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - transformers without the attention interface
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not backend.HAS_TRITON:
        return False
    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception:  # pragma: no cover - a model that cannot switch: it keeps SDPA
        return False
    return model.config._attn_implementation == IMPLEMENTATION
