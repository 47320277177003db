"""Running a WINA-gated linear ``y = (x * [|x| > thr]) W^T (+ b)``: which path, launching it, the fallbacks.

The weight is stored transposed and input-major (``weight_t = W^T``, ``[in, out_total]``, contiguous),
so input channel ``i`` is one contiguous row of ``weight_t``; a dropped channel's row is never read.
Several matrices that share one input (q/k/v, gate/up) are concatenated along ``out`` and each keeps its
own threshold row (``thresholds [n_mats, in]``, ``splits`` = the out sizes).

Paths (chosen by the number of rows ``M`` of ``x`` flattened to ``[M, in]``):

* ``M == 1`` (decode): the split-K GEMV of ``gemv.py``, one launch per group of matrices.
* ``1 < M <= BATCH_SPARSE_MAX`` (``configs.py``; off by default): the batched kernel of ``gemv.py``.
* otherwise: a dense ``(x * mask) @ W^T`` through torch (cuBLAS), which won at every B >= 2 measured
  (the union mask is nearly full; see docs/kernels.md).

Host cost: a launch reuses the compiled kernel's launcher with raw addresses (``launch_kernel``), but on the
device machine one call still costs ~60 us of CPU; decode must run under CUDA graphs to see the GPU-side
speedup (measured per layer: eager sparse is slower than eager dense there).

The split-K workspace is per device AND stream (every launch leaves it zeroed): two models, or one
model's graphs and an eager call, may run on two streams of one device at the same time. Importing this module needs no triton: ``backend.HAS_TRITON`` is then False,
``gated_linear`` computes with torch and ``reference_gated_linear`` still works. ``gated_linear_op`` is the
same function as an opaque operator for ``torch.compile``.
"""

from __future__ import annotations

import os

import torch

from . import backend, configs, gemv  # gemv: the triton kernels (defined only with triton)
from .configs import DEFAULT_GEMM, DEFAULT_GEMV, TUNED_GEMV, Config, default_gemv

__all__ = ["pack_weight", "gated_linear", "gated_linear_op", "reference_gated_linear", "reserve_workspace",
           "launch_kernel", "cdiv", "Config", "DEFAULT_GEMV", "TUNED_GEMV"]

# Most matrices one launch handles (column boundaries are passed as scalars).
_MAX_MATS = 4


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


def reference_gated_linear(x, weight_t, thresholds, splits=None, bias=None, rms=None, lr=None) -> torch.Tensor:
    """Plain torch masking: ``y[..., o] = sum_i W[o, i] x_i [|x_i| > thr_{m(o)}[i]] (+ b[o])``.

    Computed in the dtype of ``x`` promoted with the weight's (pass float64 tensors for a reference).
    ``rms``: ``(norm, mask, n, eps)``, ``lr``: ``(lrb, lra, rank, mask)``, as in ``gated_linear``.
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
    if lr is not None and lr[3]:
        lead = y.shape[:-1]
        y = y + _lowrank_term(xs.reshape(-1, n_in), thr.to(x.device), splits, *lr).reshape(*lead, n_out).to(dtype)
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
                  rms=None, lr=None) -> torch.Tensor:
    """The batch path through cuBLAS: mask ``x`` per matrix, multiply by the column slice of ``W^T``
    (plus the low-rank term of ``lr``, ``_lowrank_term``)."""
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
    if lr is not None and lr[3]:
        y = y + _lowrank_term(x2, thr, splits, *lr).to(y.dtype)
    if rms is not None:
        y = _scale_rms(y, splits, *rms)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _lowrank_term(x2: torch.Tensor, thr: torch.Tensor, splits: list[int], lrb: torch.Tensor, lra: torch.Tensor,
                  rank: int, mask: int) -> torch.Tensor:
    """``[M, N]``: ``A_p (B_p (x * [|x| <= thr_p]))`` in the columns of each matrix ``p`` flagged in ``mask``,
    zero elsewhere (``lrb = [B_0^T | B_1^T | ...]`` ``[K, n R]``, ``lra = A^T`` ``[R, N_lr]``), in the
    dtype of ``x`` promoted with the factors'."""
    dtype = torch.promote_types(x2.dtype, lrb.dtype)
    y = x2.new_zeros((x2.shape[0], sum(splits)), dtype=dtype)
    start = 0
    for m, size in enumerate(splits):
        if (mask >> m) & 1 and start < lra.shape[1]:
            row = thr[m if thr.shape[0] > 1 else 0]
            dropped = x2.to(dtype) * (x2.abs().to(torch.float64) <= row.to(torch.float64)).to(dtype)
            z = dropped @ lrb[:, m * rank : (m + 1) * rank].to(dtype)
            y[:, start : start + size] = z @ lra[:, start : start + size].to(dtype)
        start += size
    return y


# --------------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------------

_SM_COUNT: dict = {}
_WORKSPACE: dict = {}
_RESERVED: dict = {}  # device -> widest output any bound model needs (a new stream's workspace starts that wide)


def _sm_count(device: torch.device) -> int:
    key = (device.type, device.index)
    if key not in _SM_COUNT:
        if device.type == "cuda":
            _SM_COUNT[key] = torch.cuda.get_device_properties(device).multi_processor_count
        else:  # the triton interpreter (TRITON_INTERPRET=1) runs on the CPU
            _SM_COUNT[key] = 4
    return _SM_COUNT[key]


def _workspace(device: torch.device, n_ws: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed fp32 accumulator and ticket counters of ``device`` on the current stream (every launch
    leaves them zeroed)."""
    key = (device.type, device.index, _stream(device) if device.type == "cuda" else 0)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None:
        widest = _RESERVED.get((device.type, device.index), 0)
        n_ws, n_cnt = max(n_ws, widest), max(n_cnt, cdiv(widest, 16) + 1)
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
    device = torch.device(device)
    key = (device.type, device.index)
    _RESERVED[key] = max(_RESERVED.get(key, 0), n_out)
    _workspace(device, n_out, cdiv(n_out, 16) + 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(K: int, n_blocks: int, block_k: int, target_programs: int) -> tuple[int, int]:
    """(rows per program, number of K splits) so that about ``target_programs`` programs run."""
    k_blocks = cdiv(K, block_k)
    split = max(1, min(k_blocks, round(target_programs / max(n_blocks, 1))))
    k_per = cdiv(k_blocks, split) * block_k
    return k_per, cdiv(K, k_per)


def _aligned_block_n(block_n: int, bounds: list[int]) -> int | None:
    """The largest power-of-two block width <= block_n that divides every inner boundary (>= 16)."""
    bn = block_n
    while bn >= 16:
        if all(b % bn == 0 for b in bounds):
            return bn
        bn //= 2
    return None


_FAST_LAUNCH = os.environ.get("WINA_FAST_LAUNCH", "1") != "0" and backend.HAS_TRITON and backend.knobs is not None
_COMPILED: dict = {}


def _stream(device: torch.device) -> int:
    try:
        return torch._C._cuda_getCurrentRawStream(device.index)
    except Exception:  # pragma: no cover - older/newer torch
        return torch.cuda.current_stream(device).cuda_stream


def launch_kernel(kernel, grid, args, consts: dict, cfg: Config, device: torch.device) -> None:
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
                       ck.launch_metadata(grid, stream, *full), backend.knobs.runtime.launch_enter_hook,
                       backend.knobs.runtime.launch_exit_hook, *full)
                return
            except Exception:  # pragma: no cover - a triton whose internals differ: use the JIT path
                _FAST_LAUNCH = False
        ck = kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if ck is not None and hasattr(ck, "packed_metadata") and list(kernel.arg_names[-len(consts):]) == list(consts):
            _COMPILED[key] = ck
        return
    kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_gemv(x1, w, thr, out, bias, bounds, cfg: Config, rms=None, lr=None):
    """One GEMV launch over ``w`` ([K, N] view, unit column stride) with <= 4 matrices.

    ``rms``: ``(norm, mask, inv_n, eps)``, the launch's matrices flagged in ``mask`` scaled (see ``gated_linear``).
    ``lr``: ``(lrb, lra, rank, mask)``, the low-rank term of the matrices flagged in ``mask`` (``lrb``
    ``[K, n R]`` with unit column stride, ``lra`` ``[R, N_lr]``, the first ``N_lr`` columns of ``w``).
    """
    K, N = w.shape
    bn = cfg.block_n
    n_blocks = cdiv(N, bn)
    has_lr = lr is not None and lr[3] != 0
    k_per, split = _split_k(K, n_blocks, cfg.block_k, int(cfg.waves * _sm_count(w.device)))
    b = list(bounds) + [N] * (3 - len(bounds))
    block_r = _block_rank(lr[2]) if has_lr else 1
    atomic = split > 1 or has_lr  # the low-rank term is added by the last program of a column block
    if atomic:
        ws, cnt = _workspace(w.device, N + (n_blocks * block_r if has_lr else 0), n_blocks)
    else:
        ws = cnt = out
    has_rms = rms is not None and rms[1] != 0
    r_ptr, r_mask, r_inv_n, r_eps = rms if has_rms else (out, 0, 0.0, 0.0)
    if has_lr:
        lrb, lra, rank, lr_mask = lr
        lr_args = [lrb, lra]
        lr_scalars = [int(rank), int(lra.shape[1]), int(lr_mask), lrb.stride(0), lra.stride(0)]
    else:
        lr_args, lr_scalars = [out, out], [0, 0, 0, 0, 0]
    launch_kernel(
        gemv.gemv_kernel, (n_blocks, split, 1),
        [x1, w, thr, out, bias if bias is not None else out, ws, cnt, r_ptr, *lr_args,
         K, N, w.stride(0), b[0], b[1], b[2], k_per, split, r_mask, float(r_inv_n), float(r_eps), *lr_scalars],
        dict(HAS_BIAS=bias is not None, ATOMIC=atomic, HAS_RMS=has_rms, BLOCK_K=cfg.block_k, BLOCK_N=bn,
             PREFETCH=bool(cfg.prefetch), PIPE=bool(cfg.pipe), ACC1D=bool(cfg.acc1d), HAS_LR=has_lr,
             BLOCK_R=block_r, R_CHUNK=max(1, min(block_r, 8192 // bn)), Z_ROWS=max(16, min(128, 4096 // block_r))),
        cfg, w.device,
    )


def _block_rank(rank: int) -> int:
    """The power of two >= ``rank`` (at least 2: a triton block)."""
    b = 2
    while b < rank:
        b *= 2
    return b


def _launch_gemm(x2, w, thr, out, bias, bounds, cfg: Config):
    M, K = x2.shape
    N = w.shape[1]
    bn, bm = cfg.block_n, cfg.block_m
    n_blocks, m_blocks = cdiv(N, bn), cdiv(M, bm)
    k_per, split = _split_k(K, n_blocks * m_blocks, cfg.block_k, int(cfg.waves * _sm_count(w.device)))
    b = list(bounds) + [N] * (3 - len(bounds))
    atomic = split > 1
    if atomic:
        ws, cnt = _workspace(w.device, M * N, n_blocks * m_blocks)
    else:
        ws = cnt = out
    launch_kernel(
        gemv.gemm_kernel, (n_blocks, split, m_blocks),
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


def _run(x2, weight_t, thr, splits, bias, out, cfg, batched, rms=None, lr=None):
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
            r = l = None
            if rms is not None:  # the flags of this launch's matrices, renumbered from 0
                r = (rms[0], (rms[1] >> m0) & ((1 << n_m) - 1), rms[2], rms[3])
            if lr is not None:  # the factors of this launch's matrices and columns
                lrb, lra, rank, lr_mask = lr
                l_mask = (lr_mask >> m0) & ((1 << n_m) - 1)
                if l_mask and c0 < lra.shape[1]:
                    l = (lrb[:, m0 * rank :], lra[:, c0 : min(c1, lra.shape[1])], rank, l_mask)
            _launch_gemv(x2, w, th, o, bi, inner, c, r, l)


def _prep_thresholds(thresholds: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    thr = thresholds if thresholds.dim() == 2 else thresholds.reshape(1, -1)
    if thr.dtype != torch.float32 or thr.device != weight_t.device or not thr.is_contiguous():
        thr = thr.to(device=weight_t.device, dtype=torch.float32).contiguous()
    return thr


def _gemv(x, weight_t, thresholds, splits=None, bias=None, out=None, cfg: Config | None = None, rms=None, lr=None):
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
        cfg = TUNED_GEMV.get((K, N)) or default_gemv(K, N)
    if rms is not None:
        norm = rms[0].reshape(1)
        if norm.dtype != torch.float32 or not norm.is_contiguous():
            norm = norm.to(torch.float32).contiguous()
        rms = (norm, int(rms[1]), 1.0 / float(rms[2]), float(rms[3]))
    _run(x1, weight_t, thr, splits, bias, out, cfg, batched=False, rms=rms, lr=lr)
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
                 rms_n: int = 1, rms_eps: float = 0.0, lr_b: torch.Tensor | None = None,
                 lr_a: torch.Tensor | None = None, lr_rank: int = 0, lr_mask: int = 0) -> torch.Tensor:
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

    ``lr_b`` ``[in, n R]`` (``[B_0^T | B_1^T | ...]``, unit column stride) and ``lr_a`` ``[R, N_lr]``
    (``A^T`` of the first ``N_lr`` output columns) with ``lr_mask``: matrix ``p`` (bit ``p`` set) adds
    ``A_p (B_p (x * [|x| <= thr_p]))``, the low-rank compensation of the channels it dropped
    (``convert --lowrank``), before the RMS scale and the bias. One token does it inside the GEMV launch.
    """
    K, N = weight_t.shape
    lead = x.shape[:-1]
    M = x.numel() // K if K else 0
    rms = None if rms_norm is None or not rms_mask else (rms_norm, int(rms_mask), int(rms_n), float(rms_eps))
    lr = None if lr_b is None or lr_a is None or not lr_mask else (lr_b, lr_a, int(lr_rank), int(lr_mask))
    if not (backend.HAS_TRITON and weight_t.is_cuda and x.is_cuda) or M == 0 or weight_t.stride(1) != 1:
        thr = _norm_thresholds(thresholds, K)
        y = _dense_masked(x.reshape(-1, K).to(weight_t.dtype), weight_t, thr.to(weight_t.device),
                          _norm_splits(splits, N, thr.shape[0]), bias, rms, lr)
        return y.reshape(*lead, N)
    if M == 1:
        return _gemv(x, weight_t, thresholds, splits, bias, rms=rms, lr=lr).reshape(*lead, N)
    thr = _norm_thresholds(thresholds, K).to(device=weight_t.device, dtype=torch.float32)
    full = _norm_splits(splits, N, thr.shape[0])
    if M <= configs.BATCH_SPARSE_MAX:
        y = _gemm_sparse(x, weight_t, thresholds, splits, bias if rms is None else None)
        if rms is not None:
            y = _scale_rms(y, full, *rms)
            if bias is not None:
                y = y + bias.to(y.dtype)
        if lr is not None:  # (the flagged matrices are never RMS-scaled ones: the order does not matter)
            y = y + _lowrank_term(x.reshape(-1, K).to(weight_t.dtype), thr, full, *lr).to(y.dtype)
        return y.reshape(*lead, N)
    y = _dense_masked(x.reshape(-1, K).to(weight_t.dtype), weight_t, thr, full, bias, rms, lr)
    return y.reshape(*lead, N)


def _register_op():
    """``torch.ops.wina.gated_linear``: ``gated_linear`` as an opaque operator for ``torch.compile``.

    Dynamo cannot trace the launch code (raw addresses, cached launchers), and must not: inside a compiled
    decode step the kernel is one node whose output shape is known (the fake implementation).
    """
    try:
        from torch.library import custom_op

        def _run(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps, lr_b, lr_a, lr_rank,
                 lr_mask):
            return gated_linear(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps,
                                lr_b, lr_a, lr_rank, lr_mask)

        op = custom_op("wina::gated_linear", _run, mutates_args=(),
                       schema="(Tensor x, Tensor weight_t, Tensor thresholds, int[] splits, Tensor? bias, "
                              "Tensor? rms_norm, int rms_mask, int rms_n, float rms_eps, Tensor? lr_b, "
                              "Tensor? lr_a, int lr_rank, int lr_mask) -> Tensor")

        @op.register_fake
        def _(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps, lr_b, lr_a, lr_rank, lr_mask):
            return x.new_empty((*x.shape[:-1], weight_t.shape[1]), dtype=weight_t.dtype)

        return op
    except Exception:  # pragma: no cover - torch < 2.4, or an API that changed: compile traces the launch code
        return None


_OP = _register_op()


def gated_linear_op(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, splits: list[int],
                    bias: torch.Tensor | None = None, rms_norm: torch.Tensor | None = None, rms_mask: int = 0,
                    rms_n: int = 1, rms_eps: float = 0.0, lr_b: torch.Tensor | None = None,
                    lr_a: torch.Tensor | None = None, lr_rank: int = 0, lr_mask: int = 0) -> torch.Tensor:
    """``gated_linear`` through the registered operator while ``torch.compile`` traces, directly otherwise."""
    if _OP is not None and torch.compiler.is_compiling():
        return _OP(x, weight_t, thresholds, list(splits), bias, rms_norm, int(rms_mask), int(rms_n), float(rms_eps),
                   lr_b, lr_a, int(lr_rank), int(lr_mask))
    return gated_linear(x, weight_t, thresholds, splits, bias, rms_norm, rms_mask, rms_n, rms_eps,
                        lr_b, lr_a, lr_rank, lr_mask)
