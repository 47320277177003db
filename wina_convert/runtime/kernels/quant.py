"""A WINA-gated linear over quantized weights: ``y = (x * [|x| > thr]) W^T (+ b)`` with ``W`` int4 or int8.

The weight is a ``QuantizedWeight`` (``wina_convert/quant.py``): codes input-major (``[in, out/2]`` bytes for
int4, ``[in, out]`` for int8), so a dropped input channel's codes are one row that is never read, and

    w[o, i] = s[i // group_in, o // group_out] * q[i, o] + m[i // group_in, o // group_out]

(``m = -8 s`` for symmetric int4, whose code is the nibble minus 8; ``m = 0`` for int8). Several matrices that
share an input (q/k/v, gate/up) are packed side by side along ``out`` (``pack_quantized``), each with its
own threshold row, as the float kernels' ``W^T``.

Paths, by the number of rows ``M`` of ``x`` flattened to ``[M, in]``:

* ``M <= MAX_ROWS`` (decode, one or a few sequences): ``quant_gemv_kernel``, a split-K GEMV that reads a
  weight row when any of the ``M`` rows keeps that channel (the union) and multiplies each row by its own
  masked ``x``. A program owns ``BLOCK_N`` outputs and a slice of the inputs. Its codes are a
  ``[BLOCK_K, NG, GB]`` tile: ``NG`` sub-blocks of ``SB`` outputs (``GB`` bytes), each inside one scale
  group, so a tile row needs ``NG`` scales, not one per code:

  - groups along the outputs (``group_in == 1``, our quantizer): ``sum_i x_i (s_ig q_io + m_ig) =
    sum_i (x_i s_ig) q_io + sum_i x_i m_ig``: ``x`` times the row's scale once per sub-block, then one
    multiply-add per code; a dropped row reads neither codes nor scales;
  - groups along the inputs (``group_out == 1``, GGUF / compressed-tensors imports): ``BLOCK_K`` divides
    ``group_in``, so the tile's rows share one scale row: ``s_o sum_i x_i q_io + m_o sum_i x_i``.

  Codes become floats by their bits (``code | 0x4B000000`` is the float ``2^23 + code``; one integer op and
  one add, where a conversion instruction runs at a quarter of the rate). Partial sums meet in a float32
  workspace (atomics); the last program of a column block (a ticket) adds the bias, writes the output
  and clears the workspace, as ``gemv.gemv_kernel`` does.
* more rows (prompts): the weight dequantized to ``x``'s dtype, then the masked product through cuBLAS
  (``launch._dense_masked``).

``reference_quant_gated_linear`` is the torch reference (and the path off CUDA / without triton);
``quant_gated_linear_op`` the same function as an opaque operator for ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...quant import QuantizedWeight
from . import backend, launch
from .backend import tl, triton
from .configs import Config

__all__ = ["reference_quant_gated_linear", "quant_gated_linear", "quant_gated_linear_op", "pack_quantized",
           "QuantConfig", "MAX_ROWS", "dequantize_t"]

# Largest number of rows the GEMV kernel takes (each row costs one multiply-add per code it reads).
MAX_ROWS = 8


@dataclass(frozen=True)
class QuantConfig:
    """One launch shape of ``quant_gemv_kernel``: outputs and input rows per tile, warps, programs per SM."""

    block_n: int = 2048
    block_k: int = 16
    num_warps: int = 4
    waves: float = 4.0
    fast_cvt: bool = True  # codes to floats through their bits instead of a conversion instruction

    def launch(self) -> Config:
        return Config(block_n=self.block_n, block_k=self.block_k, num_warps=self.num_warps, num_stages=1,
                      waves=self.waves)


# (bits, group along inputs, K, N) -> config; tuned by benchmarks/bench_quant_kernels.py (--sweep).
TUNED: dict[tuple, QuantConfig] = {}


def default_config(bits: int, along_in: bool, K: int, N: int) -> QuantConfig:
    if (bits, along_in, K, N) in TUNED:
        return TUNED[(bits, along_in, K, N)]
    bn = 2048 if bits == 4 else 1024
    while bn > 64 and bn >= 2 * N:
        bn //= 2
    return QuantConfig(block_n=bn)


def pack_quantized(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Matrices that share an input, side by side along ``out`` (the layout ``launch.pack_weight`` gives
    float ``W^T``): codes, scales and offsets concatenated along their output dimension. Needs one code
    width, one group shape and offsets on all or none."""
    if len(weights) == 1:
        return weights[0]
    first = weights[0]
    shapes = {(q.bits, q.group_in, q.group_out if q.group_in == 1 else 1, q.offsets is None, q.in_features,
               q.scales.dtype) for q in weights}
    if len(shapes) != 1:
        raise ValueError(f"quantized matrices of different layouts cannot share a launch: {sorted(map(str, shapes))}")
    if first.group_in == 1 and any(q.out_features % q.group_out for q in weights):
        raise ValueError("a matrix's outputs are not whole groups")
    return QuantizedWeight(
        torch.cat([q.qweight for q in weights], dim=1).contiguous(),
        torch.cat([q.scales for q in weights], dim=1).contiguous(),
        None if first.offsets is None else torch.cat([q.offsets for q in weights], dim=1).contiguous(),
    )


def dequantize_t(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W^T`` (``[in, out]``) in ``dtype``, computed in float32 as ``QuantizedWeight.dequantize``."""
    return q.dequantize(torch.float32).t().to(dtype)


def reference_quant_gated_linear(x: torch.Tensor, thresholds: torch.Tensor, q: QuantizedWeight,
                                 splits: list[int] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: ``y[..., o] = sum_i W[o, i] x_i [|x_i| > thr_{m(o)}[i]] (+ b[o])`` with ``W`` dequantized in
    float32, the product in the dtype of ``x`` promoted with float32 (pass float64 ``x`` for a reference)."""
    w_t = q.dequantize(torch.float32).t().to(device=x.device)
    return launch.reference_gated_linear(x, w_t, thresholds.to(x.device), splits, bias)


# --------------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------------

if backend.HAS_TRITON:

    @triton.jit
    def _codes(qt, INT4: tl.constexpr, HIGH: tl.constexpr, FAST: tl.constexpr):
        """The codes of a uint8 tile as float32: a nibble (0..15) for int4, the byte as unsigned + 128 offset
        removed (-128..127) for int8 (the tile holds the int8 codes' bits)."""
        if INT4:
            b = qt.to(tl.int32)
            n = (b >> 4) if HIGH else (b & 15)
            if FAST:
                return (n | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            return n.to(tl.float32)
        else:
            b = qt.to(tl.int32)
            if FAST:
                return ((b ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            return qt.to(tl.int8, bitcast=True).to(tl.float32)

    @triton.jit
    def quant_gemv_kernel(
        x_ptr, q_ptr, s_ptr, m_ptr, thr_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
        M, K, N, stride_xm, stride_q, stride_s, stride_om, B1, B2, B3, K_PER_SPLIT, SPLIT_K,
        INT4: tl.constexpr, HAS_OFF: tl.constexpr, ALONG_IN: tl.constexpr, GROUP: tl.constexpr,
        SB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, FAST: tl.constexpr,
    ):
        NG: tl.constexpr = BLOCK_N // SB  # sub-blocks of SB outputs, each inside one scale group
        GB: tl.constexpr = SB // 2 if INT4 else SB  # bytes (codes of one nibble plane) per sub-block
        STEP: tl.constexpr = 2 if INT4 else 1  # outputs per byte
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        g = tl.arange(0, NG)
        j = tl.arange(0, GB)
        cols = (g[:, None] * GB + j[None, :])  # [NG, GB] byte columns inside the block
        o_lo = n0 + cols * STEP  # the output of each byte's (low) code
        n_mask = o_lo < N
        mat = (n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32) + (n0 >= B3).to(tl.int32)
        thr_row = thr_ptr + mat * K
        k_start = pid_k * K_PER_SPLIT
        rows = tl.arange(0, M_PAD)[:, None, None]  # [M_PAD, 1, 1]
        acc_lo = tl.zeros([M_PAD, NG, GB], dtype=tl.float32)
        acc_hi = tl.zeros([M_PAD, NG, GB], dtype=tl.float32)
        kk = tl.arange(0, BLOCK_K)[:, None, None]  # [BK, 1, 1]
        s_cols = ((n0 + g * SB) // GROUP)[None, :, None]  # [1, NG, 1] (groups along the outputs)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = k_start + k0 + kk
            k_mask = offs_k < K
            th = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
            any_keep = tl.zeros([BLOCK_K, 1, 1], dtype=tl.int1)
            for m in tl.static_range(M_PAD):
                xm = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask & (m < M), other=0.0).to(tl.float32)
                any_keep = any_keep | ((tl.abs(xm) > th) & k_mask & (m < M))
            qt = tl.load(q_ptr + offs_k * stride_q + n0 // STEP + cols[None, :, :],
                         mask=any_keep & n_mask[None, :, :], other=0, eviction_policy="evict_first")
            lo = _codes(qt, INT4, False, FAST)
            if INT4:
                hi = _codes(qt, INT4, True, FAST)
            if ALONG_IN:
                # the tile's rows share one scale row (BLOCK_K divides the group): s_o, m_o per output
                srow = (k_start + k0) // GROUP
                any_row = tl.max(any_keep.to(tl.int32), axis=0)  # [1, 1]: a row of the tile is kept
                o3 = o_lo[None, :, :]
                sm = (any_row[None, :, :] > 0) & n_mask[None, :, :]
                s_lo = tl.load(s_ptr + srow * stride_s + o3, mask=sm, other=0.0).to(tl.float32)
                if INT4:
                    s_hi = tl.load(s_ptr + srow * stride_s + o3 + 1, mask=sm, other=0.0).to(tl.float32)
                if HAS_OFF:
                    m_lo = tl.load(m_ptr + srow * stride_s + o3, mask=sm, other=0.0).to(tl.float32)
                    if INT4:
                        m_hi = tl.load(m_ptr + srow * stride_s + o3 + 1, mask=sm, other=0.0).to(tl.float32)
                elif INT4:  # symmetric int4: the code is the nibble minus 8
                    m_lo = -8.0 * s_lo
                    m_hi = -8.0 * s_hi
            else:
                # one scale per (row, sub-block), read with the row (a dropped row reads none)
                sm = any_keep & (s_cols < tl.cdiv(N, GROUP))
                s3 = tl.load(s_ptr + offs_k * stride_s + s_cols, mask=sm, other=0.0).to(tl.float32)  # [BK, NG, 1]
                if HAS_OFF:
                    m3 = tl.load(m_ptr + offs_k * stride_s + s_cols, mask=sm, other=0.0).to(tl.float32)
                elif INT4:
                    m3 = -8.0 * s3
            for m in tl.static_range(M_PAD):
                xm = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask & (m < M), other=0.0).to(tl.float32)
                xm = tl.where((tl.abs(xm) > th) & k_mask, xm, 0.0)  # [BK, 1, 1]
                if ALONG_IN:
                    p_lo = tl.sum(xm * lo, axis=0)[None, :, :] * s_lo  # [1, NG, GB]
                    if INT4:
                        p_hi = tl.sum(xm * hi, axis=0)[None, :, :] * s_hi
                    if HAS_OFF or INT4:
                        sx = tl.sum(xm, axis=0)[None, :, :]  # [1, 1, 1]
                        p_lo += sx * m_lo
                        if INT4:
                            p_hi += sx * m_hi
                else:
                    xs = xm * s3  # [BK, NG, 1]
                    p_lo = tl.sum(xs * lo, axis=0)[None, :, :]
                    if INT4:
                        p_hi = tl.sum(xs * hi, axis=0)[None, :, :]
                    if HAS_OFF or INT4:
                        pm = tl.sum(xm * m3, axis=0)[None, :, :]  # [1, NG, 1]
                        p_lo += pm
                        if INT4:
                            p_hi += pm
                if M_PAD == 1:
                    acc_lo += p_lo
                    if INT4:
                        acc_hi += p_hi
                else:
                    acc_lo = tl.where(rows == m, acc_lo + p_lo, acc_lo)
                    if INT4:
                        acc_hi = tl.where(rows == m, acc_hi + p_hi, acc_hi)
        o3 = o_lo[None, :, :]
        mask3 = n_mask[None, :, :] & (rows < M)
        if ATOMIC:
            tl.atomic_add(ws_ptr + rows * N + o3, acc_lo, mask=mask3, sem="relaxed")
            if INT4:
                tl.atomic_add(ws_ptr + rows * N + o3 + 1, acc_hi, mask=mask3, sem="relaxed")
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                zero = tl.zeros([M_PAD, NG, GB], dtype=tl.float32)
                tot_lo = tl.atomic_add(ws_ptr + rows * N + o3, zero, mask=mask3, sem="relaxed")
                tl.store(ws_ptr + rows * N + o3, zero, mask=mask3)
                if HAS_BIAS:
                    tot_lo += tl.load(bias_ptr + o3, mask=n_mask[None, :, :], other=0.0).to(tl.float32)
                tl.store(out_ptr + rows * stride_om + o3, tot_lo.to(out_ptr.dtype.element_ty), mask=mask3)
                if INT4:
                    tot_hi = tl.atomic_add(ws_ptr + rows * N + o3 + 1, zero, mask=mask3, sem="relaxed")
                    tl.store(ws_ptr + rows * N + o3 + 1, zero, mask=mask3)
                    if HAS_BIAS:
                        tot_hi += tl.load(bias_ptr + o3 + 1, mask=n_mask[None, :, :], other=0.0).to(tl.float32)
                    tl.store(out_ptr + rows * stride_om + o3 + 1, tot_hi.to(out_ptr.dtype.element_ty), mask=mask3)
                tl.store(cnt_ptr + pid_n, 0)
        else:
            if HAS_BIAS:
                acc_lo += tl.load(bias_ptr + o3, mask=n_mask[None, :, :], other=0.0).to(tl.float32)
            tl.store(out_ptr + rows * stride_om + o3, acc_lo.to(out_ptr.dtype.element_ty), mask=mask3)
            if INT4:
                if HAS_BIAS:
                    acc_hi += tl.load(bias_ptr + o3 + 1, mask=n_mask[None, :, :], other=0.0).to(tl.float32)
                tl.store(out_ptr + rows * stride_om + o3 + 1, acc_hi.to(out_ptr.dtype.element_ty), mask=mask3)


# --------------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------------

def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _shape(q: QuantizedWeight, cfg: QuantConfig, bounds: list[int]) -> tuple[int, int, int, int] | None:
    """``(BLOCK_N, SB, BLOCK_K, GROUP)`` for a launch over ``q`` with inner matrix boundaries ``bounds``, or
    None when the layout has no kernel shape (the caller computes through torch)."""
    along_in = q.group_in > 1
    n_out = q.out_features
    bn = cfg.block_n
    # a column block never straddles a matrix boundary
    while bn >= 16 and any(b % bn for b in bounds):
        bn //= 2
    if bn < 16:
        return None
    if along_in:
        bk = _pow2_divisor(q.group_in, cfg.block_k)
        if bk < 4:
            return None
        return bn, bn, bk, q.group_in
    # sub-blocks inside one group of outputs: SB divides group_out and block_n (a power of two)
    sb = _pow2_divisor(q.group_out, bn)
    if sb < (4 if q.bits == 4 else 2) or bn // sb > 256:
        return None
    return bn, sb, cfg.block_k, q.group_out


def _launch(x2: torch.Tensor, q: QuantizedWeight, thr: torch.Tensor, out: torch.Tensor, bias, bounds: list[int],
            cfg: QuantConfig) -> bool:
    """One launch over the packed ``q`` (<= 4 matrices, ``bounds`` their inner boundaries); False when the
    layout has no kernel shape."""
    shape = _shape(q, cfg, bounds)
    if shape is None:
        return False
    bn, sb, bk, group = shape
    M, K = x2.shape
    N = q.out_features
    n_blocks = launch.cdiv(N, bn)
    k_per, split = launch._split_k(K, n_blocks, bk, int(cfg.waves * launch._sm_count(q.qweight.device)))
    m_pad = 1
    while m_pad < M:
        m_pad *= 2
    atomic = split > 1
    if atomic:
        ws, cnt = launch._workspace(q.qweight.device, M * N, n_blocks)
    else:
        ws = cnt = out
    b = list(bounds) + [N] * (3 - len(bounds))
    codes = q.qweight if q.bits == 4 else q.qweight.view(torch.uint8)
    launch.launch_kernel(
        quant_gemv_kernel, (n_blocks, split, 1),
        [x2, codes, q.scales, q.offsets if q.offsets is not None else q.scales, thr, out,
         bias if bias is not None else out, ws, cnt,
         M, K, N, x2.stride(0), codes.stride(0), q.scales.stride(0), out.stride(0), b[0], b[1], b[2], k_per, split],
        dict(INT4=q.bits == 4, HAS_OFF=q.offsets is not None, ALONG_IN=q.group_in > 1, GROUP=group, SB=sb,
             BLOCK_N=bn, BLOCK_K=bk, M_PAD=m_pad, HAS_BIAS=bias is not None, ATOMIC=atomic, FAST=bool(cfg.fast_cvt)),
        cfg.launch(), q.qweight.device,
    )
    return True


def _columns(q: QuantizedWeight, c0: int, c1: int) -> QuantizedWeight:
    """The matrices of output columns ``c0:c1`` of a packed weight (views)."""
    if (c0, c1) == (0, q.out_features):
        return q
    step = 2 if q.bits == 4 else 1
    g = q.group_out
    sl = lambda t: None if t is None else t[:, c0 // g : c1 // g]  # noqa: E731
    return QuantizedWeight(q.qweight[:, c0 // step : c1 // step], sl(q.scales), sl(q.offsets))


def _kernel_path(x2, q, thr, splits, bias, out, cfg: QuantConfig | None) -> bool:
    """Launch the GEMV over every group of matrices (``launch._plan``); False if some layout has no kernel
    shape (nothing is then left half-written: the caller recomputes everything through torch)."""
    along_in = q.group_in > 1
    if cfg is None:
        cfg = default_config(q.bits, along_in, q.in_features, q.out_features)
    plan = launch._plan(splits, thr.shape[0], cfg.block_n)
    jobs = []
    for c0, c1, m0, inner, bn in plan:
        if q.group_in == 1 and (c0 % q.group_out or c1 % q.group_out):
            return False
        if q.bits == 4 and (c0 % 2 or c1 % 2):
            return False
        sub = _columns(q, c0, c1)
        c = cfg if bn == cfg.block_n else QuantConfig(**{**cfg.__dict__, "block_n": bn})
        if _shape(sub, c, inner) is None:
            return False
        jobs.append((sub, thr[m0 : m0 + len(inner) + 1], out[:, c0:c1], None if bias is None else bias[c0:c1], inner, c))
    for sub, th, o, bi, inner, c in jobs:
        _launch(x2, sub, th, o, bi, inner, c)
    return True


def quant_gated_linear(x: torch.Tensor, thresholds: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       offsets: torch.Tensor | None = None, splits: list[int] | None = None,
                       bias: torch.Tensor | None = None, cfg: QuantConfig | None = None) -> torch.Tensor:
    """``y[..., o] = sum_i W[o, i] x_i [|x_i| > thr_{m(o)}[i]] (+ bias)`` in ``x``'s dtype, ``W`` the quantized
    weight ``(qweight, scales, offsets)`` (``QuantizedWeight``'s tensors, several matrices packed along out
    by ``pack_quantized``, ``splits`` their out sizes, ``thresholds`` ``[in]`` or ``[n_mats, in]``).

    Up to ``MAX_ROWS`` rows through the GEMV kernel on CUDA; more rows, or no CUDA/triton, through the
    dequantized weight and torch. Thresholds of ``-inf`` keep every channel (dense through the same kernel).
    """
    q = QuantizedWeight(qweight, scales, offsets)
    K, N = q.in_features, q.out_features
    lead = x.shape[:-1]
    M = x.numel() // K if K else 0
    thr = launch._norm_thresholds(thresholds, K)
    full = launch._norm_splits(splits, N, thr.shape[0])
    on_gpu = backend.HAS_TRITON and x.is_cuda and qweight.is_cuda
    if on_gpu and 0 < M <= MAX_ROWS:
        x2 = x.reshape(M, K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        thr32 = launch._prep_thresholds(thr, qweight)
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if _kernel_path(x2, q, thr32, full, bias, out, cfg):
            return out.reshape(*lead, N)
    if M == 0:
        return x.new_empty((*lead, N))
    # prompts (and layouts without a kernel shape): the dequantized weight, the masked product through torch
    w_t = dequantize_t(q, x.dtype)
    y = launch._dense_masked(x.reshape(M, K), w_t, thr.to(device=x.device), full, bias)
    return y.reshape(*lead, N)


def _register_op():
    """``torch.ops.wina.quant_gated_linear``: ``quant_gated_linear`` as an opaque operator for ``torch.compile``."""
    try:
        from torch.library import custom_op

        def _run(x, thresholds, qweight, scales, offsets, splits, bias):
            return quant_gated_linear(x, thresholds, qweight, scales, offsets, splits, bias)

        op = custom_op("wina::quant_gated_linear", _run, mutates_args=(),
                       schema="(Tensor x, Tensor thresholds, Tensor qweight, Tensor scales, Tensor? offsets, "
                              "int[] splits, Tensor? bias) -> Tensor")

        @op.register_fake
        def _(x, thresholds, qweight, scales, offsets, splits, bias):
            n = qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
            return x.new_empty((*x.shape[:-1], n))

        return op
    except Exception:  # pragma: no cover - torch < 2.4: compile traces the launch code
        return None


_OP = _register_op()


def quant_gated_linear_op(x: torch.Tensor, thresholds: torch.Tensor, q: QuantizedWeight, splits: list[int],
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``quant_gated_linear`` through the registered operator while ``torch.compile`` traces, directly otherwise."""
    if _OP is not None and torch.compiler.is_compiling():
        return _OP(x, thresholds, q.qweight, q.scales, q.offsets, list(splits), bias)
    return quant_gated_linear(x, thresholds, q.qweight, q.scales, q.offsets, splits, bias)
