"""Triton kernels for WINA-gated linears: ``y = (x * [|x| > thr]) W^T (+ b)``.

The weight is stored transposed and input-major (``weight_t = W^T``, ``[in, out_total]``, contiguous),
so input channel ``i`` is one contiguous row of ``weight_t``; a dropped channel's row is never read.
Several matrices that share one input (q/k/v, gate/up) are concatenated along ``out`` and each keeps its
own threshold row (``thresholds [n_mats, in]``, ``splits`` = the out sizes).

Paths (chosen by the number of rows ``M`` of ``x`` flattened to ``[M, in]``):

* ``M == 1`` (decode): a split-K GEMV. Each program owns ``BLOCK_N`` output columns (inside one matrix)
  and a slice of the input rows; it loads ``x`` and the thresholds of its slice, and reads the weight
  tile with the row mask ``|x_i| > thr_i``, so predicated-off rows issue no memory request. Partial sums
  go into an fp32 workspace by atomics; the last program of each column block (a ticket counter) reads
  the sums back, adds the bias, writes the output in the weight's dtype and clears the workspace, so one
  launch does everything.
* ``1 < M <= BATCH_SPARSE_MAX`` (off by default): the same scheme with ``tl.dot``; a weight row is read
  when any of the rows keeps that channel (the union), each row multiplies with its own masked ``x``.
* otherwise: a dense ``(x * mask) @ W^T`` through torch (cuBLAS), which won at every B >= 2 measured
  (the union mask is nearly full; see benchmarks/KERNELS.md).

Host cost: a launch reuses the compiled kernel's launcher with raw addresses (``_launch``), but on the
device machine one call still costs ~60 us of CPU; decode must run under CUDA graphs to see the GPU-side
speedup (measured per layer: eager sparse is slower than eager dense there).

The workspace is per device and is reset by every launch, so calls must not run concurrently on two
streams of one device. Importing this module needs no triton: ``triton_available`` is then False and
``reference_gated_linear`` still works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # triton is optional: CPU installs import this module only for the reference
    import triton
    import triton.language as tl

    try:
        from triton import knobs as _knobs
    except Exception:  # pragma: no cover - triton without knobs: no fast launches
        _knobs = None
    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _knobs = None
    _HAS_TRITON = False

__all__ = ["triton_available", "pack_weight", "gated_linear", "gated_linear_op", "reference_gated_linear",
           "reserve_workspace", "BATCH_SPARSE_MAX"]

# Largest number of rows that still goes through the sparse batched kernel. Measured on an H100 (CUDA
# graphs, B = 2..64): the union mask keeps 73% of rows at B=2, s=0.5 and the tl.dot kernel lost to masked
# cuBLAS on o/gate_up/down at every B, so every B > 1 goes to cuBLAS (set >1 to route small B to the kernel).
BATCH_SPARSE_MAX = 1
# Most matrices one launch handles (column boundaries are passed as scalars).
_MAX_MATS = 4


def triton_available(device) -> bool:
    """True when ``device`` is a CUDA device and triton can be imported."""
    if not _HAS_TRITON:
        return False
    try:
        dev = torch.device(device)
    except Exception:
        return False
    return dev.type == "cuda" and torch.cuda.is_available()


def pack_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    """``[out_k, in]`` matrices (nn.Linear convention) -> one contiguous ``W^T`` of ``[in, sum out_k]``."""
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    if not weights:
        raise ValueError("pack_weight needs at least one matrix")
    ins = {int(w.shape[1]) for w in weights}
    if len(ins) != 1:
        raise ValueError(f"the matrices have different input sizes: {sorted(ins)}")
    return torch.cat([w.detach() for w in weights], dim=0).t().contiguous()


def _norm_thresholds(thresholds: torch.Tensor, n_in: int) -> torch.Tensor:
    thr = thresholds.reshape(-1, n_in) if thresholds.dim() != 1 else thresholds.reshape(1, n_in)
    return thr


def _norm_splits(splits, n_out: int, n_mats: int) -> list[int]:
    if splits is None:
        splits = [n_out] if n_mats == 1 else None
    if splits is None:
        raise ValueError(f"{n_mats} threshold rows need splits")
    splits = [int(s) for s in splits]
    if sum(splits) != n_out:
        raise ValueError(f"splits {splits} do not add up to the {n_out} output columns")
    if len(splits) != n_mats:
        if n_mats == 1:
            return splits  # one threshold row shared by every matrix
        raise ValueError(f"{len(splits)} splits but {n_mats} threshold rows")
    return splits


def reference_gated_linear(x, weight_t, thresholds, splits=None, bias=None, rms=None) -> torch.Tensor:
    """Plain torch masking: ``y[..., o] = sum_i W[o, i] x_i [|x_i| > thr_{m(o)}[i]] (+ b[o])``.

    Computed in the dtype of ``x`` promoted with the weight's (pass float64 tensors for a reference).
    ``rms``: ``(norm, mask, n, eps)`` as in ``gated_linear``.
    """
    n_in, n_out = weight_t.shape
    thr = _norm_thresholds(thresholds, n_in)
    splits = _norm_splits(splits, n_out, thr.shape[0])
    dtype = torch.promote_types(x.dtype, weight_t.dtype)
    xs = x.to(dtype)
    w = weight_t.to(dtype)
    outs, start = [], 0
    for m, size in enumerate(splits):
        row = thr[m if thr.shape[0] > 1 else 0]
        keep = x.abs().to(torch.float64) > row.to(device=x.device, dtype=torch.float64)
        outs.append((xs * keep.to(dtype)) @ w[:, start : start + size])
        start += size
    y = torch.cat(outs, dim=-1)
    if rms is not None:
        y = _scale_rms(y, splits, *rms)
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def _scale_rms(y: torch.Tensor, splits: list[int], norm: torch.Tensor, mask: int, n: int, eps: float) -> torch.Tensor:
    """``y [..., out]`` with the columns of the matrices flagged in ``mask`` times ``sqrt(norm^2 / n + eps)``
    (``norm`` one value per row of ``y``)."""
    if not mask:
        return y
    factor = torch.sqrt(norm.to(torch.float64).reshape(*y.shape[:-1], 1) ** 2 / n + eps)
    parts, start = [], 0
    for m, size in enumerate(splits):
        part = y[..., start : start + size]
        parts.append((part.to(torch.float64) * factor).to(y.dtype) if (mask >> m) & 1 else part)
        start += size
    return torch.cat(parts, dim=-1)


def _dense_masked(x2: torch.Tensor, weight_t: torch.Tensor, thr: torch.Tensor, splits: list[int], bias,
                  rms=None) -> torch.Tensor:
    """The batch path through cuBLAS: mask ``x`` per matrix, multiply by the column slice of ``W^T``."""
    ax = x2.abs()
    P, M = thr.shape[0], x2.shape[0]
    if P == 1:
        y = torch.matmul(x2 * (ax > thr[0]).to(x2.dtype), weight_t)
    elif P * M <= 256:
        # few rows: one pass over the whole weight with the P masked copies of x stacked, keep the
        # diagonal blocks (the weight read dominates; the extra rows cost nothing)
        xm = x2.unsqueeze(0) * (ax.unsqueeze(0) > thr[:, None, :]).to(x2.dtype)  # [P, M, K]
        yy = torch.matmul(xm.reshape(P * M, -1), weight_t).reshape(P, M, -1)
        outs, start = [], 0
        for m, size in enumerate(splits):
            outs.append(yy[m, :, start : start + size])
            start += size
        y = torch.cat(outs, dim=-1)
    else:
        outs, start = [], 0
        for m, size in enumerate(splits):
            outs.append(torch.matmul(x2 * (ax > thr[m]).to(x2.dtype), weight_t[:, start : start + size]))
            start += size
        y = torch.cat(outs, dim=-1)
    if rms is not None:
        y = _scale_rms(y, splits, *rms)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


# --------------------------------------------------------------------------------------------------
# triton kernels
# --------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, thr_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, rms_ptr,
        K, N, stride_w, B1, B2, B3, K_PER_SPLIT, SPLIT_K, RMS_MASK, RMS_INV_N, RMS_EPS,
        HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, HAS_RMS: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, PIPE: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # the matrix this column block belongs to (blocks never straddle a boundary)
        mat = (n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32) + (n0 >= B3).to(tl.int32)
        thr_row = thr_ptr + mat * K
        k_start = pid_k * K_PER_SPLIT
        if PIPE:
            # two weight tiles in flight: the next tile's loads are issued before this one is consumed
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            th = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
            keep = (tl.abs(xv) > th) & k_mask
            w = tl.load(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], mask=keep[:, None] & n_mask[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(BLOCK_K, K_PER_SPLIT + BLOCK_K, BLOCK_K):
                offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
                k_mask = (offs_k < K) & (k0 < K_PER_SPLIT)
                xn = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                tn = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
                keepn = (tl.abs(xn) > tn) & k_mask
                wn = tl.load(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], mask=keepn[:, None] & n_mask[None, :],
                             other=0.0, eviction_policy="evict_first")
                acc1 += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
                xv, w = xn, wn
            part = acc1
        else:
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            if PREFETCH:  # x and thr of the next block load while this block's weight rows are in flight
                offs_p = k_start + tl.arange(0, BLOCK_K)
                x_next = tl.load(x_ptr + offs_p, mask=offs_p < K, other=0.0).to(tl.float32)
                t_next = tl.load(thr_row + offs_p, mask=offs_p < K, other=float("inf"))
            for k0 in range(0, K_PER_SPLIT, BLOCK_K):
                offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                if PREFETCH:
                    xv = x_next
                    th = t_next
                    offs_p = offs_k + BLOCK_K
                    x_next = tl.load(x_ptr + offs_p, mask=offs_p < K, other=0.0).to(tl.float32)
                    t_next = tl.load(thr_row + offs_p, mask=offs_p < K, other=float("inf"))
                else:
                    xv = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                    th = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
                keep = (tl.abs(xv) > th) & k_mask
                w = tl.load(
                    w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
                    mask=keep[:, None] & n_mask[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                )
                acc += w.to(tl.float32) * xv[:, None]
            part = tl.sum(acc, axis=0)
        if ATOMIC:
            tl.atomic_add(ws_ptr + offs_n, part, mask=n_mask, sem="relaxed")
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                # read the finished sums at L2 (an atomic), then clear them for the next launch
                tot = tl.atomic_add(ws_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_mask, sem="relaxed")
                tl.store(ws_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_mask)
                if HAS_RMS:
                    tot = tot * _rms_factor(rms_ptr, mat, RMS_MASK, RMS_INV_N, RMS_EPS)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs_n, tot.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.store(cnt_ptr + pid_n, 0)
        else:
            if HAS_RMS:
                part = part * _rms_factor(rms_ptr, mat, RMS_MASK, RMS_INV_N, RMS_EPS)
            if HAS_BIAS:
                part += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, part.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _rms_factor(rms_ptr, mat, RMS_MASK, RMS_INV_N, RMS_EPS):
        """``sqrt(v^2 / n + eps)`` (the RMS of a vector of L2 norm ``v``) for the flagged matrices, else 1."""
        v = tl.load(rms_ptr).to(tl.float32)
        flagged = ((RMS_MASK >> mat) & 1) != 0
        return tl.where(flagged, tl.sqrt(v * v * RMS_INV_N + RMS_EPS), 1.0)

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, thr_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
        M, K, N, stride_xm, stride_w, stride_om, B1, B2, B3, K_PER_SPLIT, SPLIT_K,
        HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        mat = (n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32) + (n0 >= B3).to(tl.int32)
        thr_row = thr_ptr + mat * K
        k_start = pid_k * K_PER_SPLIT
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            th = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
            keep = (tl.abs(xv.to(tl.float32)) > th[None, :]) & m_mask[:, None] & k_mask[None, :]
            xm = tl.where(keep, xv, tl.zeros_like(xv))
            row_any = tl.max(keep.to(tl.int32), axis=0) > 0
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
                mask=row_any[:, None] & n_mask[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            acc = tl.dot(xm.to(w.dtype), w, acc)
        ws_offs = offs_m[:, None] * N + offs_n[None, :]
        o_offs = offs_m[:, None] * stride_om + offs_n[None, :]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(ws_ptr + ws_offs, acc, mask=mn_mask, sem="relaxed")
            tl.debug_barrier()
            cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
            ticket = tl.atomic_add(cnt, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                tot = tl.atomic_add(ws_ptr + ws_offs, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=mn_mask, sem="relaxed")
                tl.store(ws_ptr + ws_offs, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=mn_mask)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + o_offs, tot.to(out_ptr.dtype.element_ty), mask=mn_mask)
                tl.store(cnt, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One launch shape: tile sizes, warps, pipelining depth, and programs per multiprocessor."""

    block_n: int = 256
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2
    waves: float = 4.0
    block_m: int = 16  # batched kernel only
    prefetch: bool = True  # GEMV only
    pipe: bool = False  # GEMV: issue the next tile's loads before consuming this one


# Per (K, N) decode configs tuned on an H100 by benchmarks/bench_kernels.py --sweep (CUDA-graph timings at
# sparsity 0.4/0.5/0.65, see benchmarks/KERNELS.md); other shapes use _default_gemv.
DEFAULT_GEMV = Config(block_n=1024, block_k=16, num_warps=4, num_stages=1, waves=2, prefetch=False)
TUNED_GEMV: dict[tuple[int, int], Config] = {
    (4096, 6144): DEFAULT_GEMV,  # Llama-3-8B q/k/v fused
    (4096, 4096): Config(block_n=1024, block_k=16, num_warps=4, num_stages=1, waves=2, prefetch=False, pipe=True),  # o
    (4096, 28672): DEFAULT_GEMV,  # gate/up fused
    (14336, 4096): DEFAULT_GEMV,  # down
}
_SMALL_GEMV = Config(block_n=256, block_k=32, num_warps=4, num_stages=1, waves=4, prefetch=True)


def _default_gemv(K: int, N: int) -> Config:
    return DEFAULT_GEMV if N >= 2048 else _SMALL_GEMV
DEFAULT_GEMM = Config(block_n=64, block_k=64, num_warps=4, num_stages=3, waves=4.0, block_m=16)

_SM_COUNT: dict = {}
_WORKSPACE: dict = {}


def _sm_count(device: torch.device) -> int:
    key = (device.type, device.index)
    if key not in _SM_COUNT:
        if device.type == "cuda":
            _SM_COUNT[key] = torch.cuda.get_device_properties(device).multi_processor_count
        else:  # the triton interpreter (TRITON_INTERPRET=1) runs on the CPU
            _SM_COUNT[key] = 4
    return _SM_COUNT[key]


def _workspace(device: torch.device, n_ws: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed fp32 accumulator and ticket counters of ``device`` (every launch leaves them zeroed)."""
    key = (device.type, device.index)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n_ws or cnt.numel() < n_cnt:
        n_ws = max(n_ws, 0 if ws is None else ws.numel())
        n_cnt = max(n_cnt, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(n_ws, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_cnt, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def reserve_workspace(device: torch.device, n_out: int) -> None:
    """Allocate the split-K workspace for outputs of up to ``n_out`` columns now.

    Called when the kernels are bound to a model, so that no launch grows the workspace while a CUDA graph
    is being captured (a buffer allocated during capture would belong to that graph's private pool).
    """
    _workspace(torch.device(device), n_out, _cdiv(n_out, 16) + 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(K: int, n_blocks: int, block_k: int, target_programs: int) -> tuple[int, int]:
    """(rows per program, number of K splits) so that about ``target_programs`` programs run."""
    k_blocks = _cdiv(K, block_k)
    split = max(1, min(k_blocks, round(target_programs / max(n_blocks, 1))))
    k_per = _cdiv(k_blocks, split) * block_k
    return k_per, _cdiv(K, k_per)


def _aligned_block_n(block_n: int, bounds: list[int]) -> int | None:
    """The largest power-of-two block width <= block_n that divides every inner boundary (>= 16)."""
    bn = block_n
    while bn >= 16:
        if all(b % bn == 0 for b in bounds):
            return bn
        bn //= 2
    return None


_FAST_LAUNCH = os.environ.get("WINA_FAST_LAUNCH", "1") != "0" and _HAS_TRITON and _knobs is not None
_COMPILED: dict = {}


def _stream(device: torch.device) -> int:
    try:
        return torch._C._cuda_getCurrentRawStream(device.index)
    except Exception:  # pragma: no cover - older/newer torch
        return torch.cuda.current_stream(device).cuda_stream


def _launch(kernel, grid, args, consts: dict, cfg: Config, device: torch.device) -> None:
    """Launch ``kernel``; the constexprs (``consts``) must be its last parameters, in order.

    The first launch of a specialization goes through triton's JIT (which compiles); later ones call
    the cached compiled kernel's launcher with raw addresses, skipping triton's argument binding and
    its per-pointer driver queries (~90 us of host time a launch on the device machine otherwise).
    """
    global _FAST_LAUNCH
    if _FAST_LAUNCH:
        vals, key = [], [id(kernel), device.index, grid, cfg.num_warps, cfg.num_stages, tuple(consts.values())]
        for a in args:
            if isinstance(a, torch.Tensor):
                p = a.data_ptr()
                vals.append(p)
                key.append((a.dtype, p % 16 == 0))
            else:
                vals.append(a)
                key.append(a)
        key = tuple(key)
        ck = _COMPILED.get(key)
        if ck is not None:
            try:
                full = vals + list(consts.values())
                stream = _stream(device)
                ck.run(grid[0], grid[1], grid[2], stream, ck.function, ck.packed_metadata,
                       ck.launch_metadata(grid, stream, *full), _knobs.runtime.launch_enter_hook,
                       _knobs.runtime.launch_exit_hook, *full)
                return
            except Exception:  # pragma: no cover - a triton whose internals differ: use the JIT path
                _FAST_LAUNCH = False
        ck = kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if ck is not None and hasattr(ck, "packed_metadata") and list(kernel.arg_names[-len(consts):]) == list(consts):
            _COMPILED[key] = ck
        return
    kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_gemv(x1, w, thr, out, bias, bounds, cfg: Config, rms=None):
    """One GEMV launch over ``w`` ([K, N] view, unit column stride) with <= 4 matrices.

    ``rms``: ``(norm, mask, inv_n, eps)``, the launch's matrices flagged in ``mask`` scaled (see ``gated_linear``).
    """
    K, N = w.shape
    bn = cfg.block_n
    n_blocks = _cdiv(N, bn)
    k_per, split = _split_k(K, n_blocks, cfg.block_k, int(cfg.waves * _sm_count(w.device)))
    b = list(bounds) + [N] * (3 - len(bounds))
    atomic = split > 1
    if atomic:
        ws, cnt = _workspace(w.device, N, n_blocks)
    else:
        ws = cnt = out
    has_rms = rms is not None and rms[1] != 0
    r_ptr, r_mask, r_inv_n, r_eps = rms if has_rms else (out, 0, 0.0, 0.0)
    _launch(
        _gemv_kernel, (n_blocks, split, 1),
        [x1, w, thr, out, bias if bias is not None else out, ws, cnt, r_ptr,
         K, N, w.stride(0), b[0], b[1], b[2], k_per, split, r_mask, float(r_inv_n), float(r_eps)],
        dict(HAS_BIAS=bias is not None, ATOMIC=atomic, HAS_RMS=has_rms, BLOCK_K=cfg.block_k, BLOCK_N=bn,
             PREFETCH=bool(cfg.prefetch), PIPE=bool(cfg.pipe)),
        cfg, w.device,
    )


def _launch_gemm(x2, w, thr, out, bias, bounds, cfg: Config):
    M, K = x2.shape
    N = w.shape[1]
    bn, bm = cfg.block_n, cfg.block_m
    n_blocks, m_blocks = _cdiv(N, bn), _cdiv(M, bm)
    k_per, split = _split_k(K, n_blocks * m_blocks, cfg.block_k, int(cfg.waves * _sm_count(w.device)))
    b = list(bounds) + [N] * (3 - len(bounds))
    atomic = split > 1
    if atomic:
        ws, cnt = _workspace(w.device, M * N, n_blocks * m_blocks)
    else:
        ws = cnt = out
    _launch(
        _gemm_kernel, (n_blocks, split, m_blocks),
        [x2, w, thr, out, bias if bias is not None else out, ws, cnt,
         M, K, N, x2.stride(0), w.stride(0), out.stride(0), b[0], b[1], b[2], k_per, split],
        dict(HAS_BIAS=bias is not None, ATOMIC=atomic, BLOCK_M=bm, BLOCK_K=cfg.block_k, BLOCK_N=bn),
        cfg, w.device,
    )


def _plan(splits: list[int], n_thr: int, block_n: int):
    """Groups of matrices to launch together: [(col0, col1, thr_rows, inner_bounds, block_n)]."""
    if n_thr == 1:
        return [(0, sum(splits), 0, [], block_n)]
    starts = [0]
    for s in splits:
        starts.append(starts[-1] + s)
    inner = starts[1:-1]
    if len(splits) <= _MAX_MATS:
        bn = _aligned_block_n(block_n, inner)
        if bn is not None:
            return [(0, starts[-1], 0, inner, bn)]
    # boundaries that no block width divides: one launch per matrix
    return [(starts[m], starts[m + 1], m, [], block_n) for m in range(len(splits))]


_PLANS: dict = {}


def _run(x2, weight_t, thr, splits, bias, out, cfg, batched, rms=None):
    pkey = (tuple(splits), thr.shape[0], cfg.block_n)
    plan = _PLANS.get(pkey)
    if plan is None:
        plan = _PLANS[pkey] = _plan(splits, thr.shape[0], cfg.block_n)
    for c0, c1, m0, inner, bn in plan:
        n_m = len(inner) + 1
        th = thr[m0 : m0 + n_m]
        c = cfg if bn == cfg.block_n else Config(**{**cfg.__dict__, "block_n": bn})
        w = weight_t[:, c0:c1] if (c0, c1) != (0, weight_t.shape[1]) else weight_t
        o = out[..., c0:c1] if w is not weight_t else out
        bi = None if bias is None else bias[c0:c1]
        if batched:
            _launch_gemm(x2, w, th, o, bi, inner, c)
        else:
            r = None
            if rms is not None:  # the flags of this launch's matrices, renumbered from 0
                r = (rms[0], (rms[1] >> m0) & ((1 << n_m) - 1), rms[2], rms[3])
            _launch_gemv(x2, w, th, o, bi, inner, c, r)


def _prep_thresholds(thresholds: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    thr = thresholds if thresholds.dim() == 2 else thresholds.reshape(1, -1)
    if thr.dtype != torch.float32 or thr.device != weight_t.device or not thr.is_contiguous():
        thr = thr.to(device=weight_t.device, dtype=torch.float32).contiguous()
    return thr


def _gemv(x, weight_t, thresholds, splits=None, bias=None, out=None, cfg: Config | None = None, rms=None):
    """The batch-1 kernel: ``x`` with ``in`` elements -> ``[out_total]`` (written into ``out`` if given)."""
    K, N = weight_t.shape
    thr = _prep_thresholds(thresholds, weight_t)
    splits = [N] if splits is None else splits
    if thr.shape[0] > 1 and len(splits) != thr.shape[0]:
        splits = _norm_splits(splits, N, thr.shape[0])  # raises the helpful error
    x1 = x.reshape(K)
    if not x1.is_contiguous():
        x1 = x1.contiguous()
    if out is None:
        out = torch.empty(N, dtype=weight_t.dtype, device=weight_t.device)
    if cfg is None:
        cfg = TUNED_GEMV.get((K, N)) or _default_gemv(K, N)
    if rms is not None:
        norm = rms[0].reshape(1)
        if norm.dtype != torch.float32 or not norm.is_contiguous():
            norm = norm.to(torch.float32).contiguous()
        rms = (norm, int(rms[1]), 1.0 / float(rms[2]), float(rms[3]))
    _run(x1, weight_t, thr, splits, bias, out, cfg, batched=False, rms=rms)
    return out


def _gemm_sparse(x, weight_t, thresholds, splits=None, bias=None, out=None, cfg: Config | None = None):
    """The batched sparse kernel: ``x [M, in]`` -> ``[M, out_total]``."""
    K, N = weight_t.shape
    thr = _norm_thresholds(thresholds, K).to(device=weight_t.device, dtype=torch.float32).contiguous()
    splits = _norm_splits(splits, N, thr.shape[0])
    x2 = x.reshape(-1, K).to(weight_t.dtype)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=weight_t.dtype, device=weight_t.device)
    cfg = cfg or DEFAULT_GEMM
    if M > cfg.block_m and cfg.block_m < 64:
        cfg = Config(**{**cfg.__dict__, "block_m": 64 if M > 16 else 16})
    _run(x2, weight_t, thr, splits, bias, out, cfg, batched=True)
    return out


def gated_linear(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, splits: list[int] | None = None,
                 bias: torch.Tensor | None = None, rms_norm: torch.Tensor | None = None, rms_mask: int = 0,
                 rms_n: int = 1, rms_eps: float = 0.0) -> torch.Tensor:
    """``y[..., o] = sum_i W[o, i] x_i [|x_i| > thr_{m(o)}[i]] (+ bias)`` in the weight's dtype.

    ``x [..., in]``; ``weight_t [in, out_total]`` (from ``pack_weight``); ``thresholds [in]`` or
    ``[n_mats, in]`` float32; ``splits`` the out sizes of the matrices. One row goes through the GEMV
    kernel, up to ``BATCH_SPARSE_MAX`` rows through the batched sparse kernel, more through cuBLAS.
    Without triton or off CUDA it falls back to the torch masking.

    ``rms_norm`` (float32, one value per row of ``x``) with ``rms_mask``: the sums of matrix ``m`` (bit
    ``m`` set) are multiplied by ``sqrt(rms_norm^2 / rms_n + rms_eps)`` before the bias, i.e. by the
    RMS of a vector of ``rms_n`` elements and L2 norm ``rms_norm``. With ``x = h / rms(h)`` (an RMSNorm
    without weight) and ``rms_norm = ||h||``, such a matrix computes ``h W^T``: a product with the
    un-normalized input in the same launch (the shortcut rotations of a transformed model).
    """
    K, N = weight_t.shape
    lead = x.shape[:-1]
    M = x.numel() // K if K else 0
    rms = None if rms_norm is None or not rms_mask else (rms_norm, int(rms_mask), int(rms_n), float(rms_eps))
    if not (_HAS_TRITON and weight_t.is_cuda and x.is_cuda) or M == 0 or weight_t.stride(1) != 1:
        thr = _norm_thresholds(thresholds, K)
        y = _dense_masked(x.reshape(-1, K).to(weight_t.dtype), weight_t, thr.to(weight_t.device),
                          _norm_splits(splits, N, thr.shape[0]), bias, rms)
        return y.reshape(*lead, N)
    if M == 1:
        return _gemv(x, weight_t, thresholds, splits, bias, rms=rms).reshape(*lead, N)
    thr = _norm_thresholds(thresholds, K).to(device=weight_t.device, dtype=torch.float32)
    full = _norm_splits(splits, N, thr.shape[0])
    if M <= BATCH_SPARSE_MAX:
        y = _gemm_sparse(x, weight_t, thresholds, splits, bias if rms is None else None)
        if rms is not None:
            y = _scale_rms(y, full, *rms)
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y.reshape(*lead, N)
    y = _dense_masked(x.reshape(-1, K).to(weight_t.dtype), weight_t, thr, full, bias, rms)
    return y.reshape(*lead, N)


def _register_op():
    """``torch.ops.wina.gated_linear``: ``gated_linear`` as an opaque operator for ``torch.compile``.

    Dynamo cannot trace the launch code (raw addresses, cached launchers), and must not: inside a compiled
    decode step the kernel is one node whose output shape is known (the fake implementation).
    """
    try:
        from torch.library import custom_op

        def _run(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps):
            return gated_linear(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps)

        op = custom_op("wina::gated_linear", _run, mutates_args=(),
                       schema="(Tensor x, Tensor weight_t, Tensor thresholds, int[] splits, Tensor? bias, "
                              "Tensor? rms_norm, int rms_mask, int rms_n, float rms_eps) -> Tensor")

        @op.register_fake
        def _(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps):
            return x.new_empty((*x.shape[:-1], weight_t.shape[1]), dtype=weight_t.dtype)

        return op
    except Exception:  # pragma: no cover - torch < 2.4, or an API that changed: compile traces the launch code
        return None


_OP = _register_op()


def gated_linear_op(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, splits: list[int],
                    bias: torch.Tensor | None = None, rms_norm: torch.Tensor | None = None, rms_mask: int = 0,
                    rms_n: int = 1, rms_eps: float = 0.0) -> torch.Tensor:
    """``gated_linear`` through the registered operator while ``torch.compile`` traces, directly otherwise."""
    if _OP is not None and torch.compiler.is_compiling():
        return _OP(x, weight_t, thresholds, list(splits), bias, rms_norm, int(rms_mask), int(rms_n), float(rms_eps))
    return gated_linear(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps)


if os.environ.get("WINA_BATCH_SPARSE_MAX"):
    BATCH_SPARSE_MAX = int(os.environ["WINA_BATCH_SPARSE_MAX"])
