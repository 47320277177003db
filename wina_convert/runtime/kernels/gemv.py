"""The triton kernels of a WINA-gated linear: ``y = (x * [|x| > thr]) W^T (+ b)``, weight rows never read
when their input channel is dropped.

``weight_t = W^T`` (``[in, out_total]``, contiguous), so input channel ``i`` is one contiguous row; several
matrices that share one input are side by side along ``out`` (column boundaries ``B1..B3``, a column
block never straddles one), each with its own threshold row.

* ``gemv_kernel`` (one token, decode): a split-K GEMV. Each program owns ``BLOCK_N`` output columns and a
  slice of the input rows; it loads ``x`` and the thresholds of its slice and reads the weight tile with
  the row mask ``|x_i| > thr_i``, so predicated-off rows issue no memory request. ``ACC1D`` sums each
  tile's rows as it arrives instead of keeping a ``[BLOCK_K, BLOCK_N]`` fp32 accumulator (which costs
  twice the tile's registers and so limits the programs, and the weight bytes in flight, per SM). With ``ATOMIC`` the
  partial sums go into an fp32 workspace; the last program of each column block (a ticket counter)
  reads them back, scales (``HAS_RMS``: ``rms_factor``), adds the bias, writes the output in the
  weight's dtype and clears the workspace, so one launch does everything.
  ``HAS_LR`` adds a low-rank compensation of the dropped channels, ``A_p (B_p (x * [|x| <= thr_p]))``
  (``convert --lowrank``), in the same launch: after the weight loop, a second loop over the slice reads
  the dropped rows of ``B_p^T`` (``lrb`` ``[in, P R]``, R numbers a row), every program adds its slice's
  ``[R]`` partial into a per-column-block workspace beside the output sums, and the last program of the
  block, which knows every slice is in, adds ``A_p^T z`` (``lra`` ``[R, N]``) before the bias.
  ``LR_MASK`` flags the matrices that take the term (bit ``p``); the others read no factor byte.
* ``gemm_kernel`` (a few rows): the same with ``tl.dot``; a weight row is read when any row keeps that
  channel (the union), each row multiplies with its own masked ``x``.

``launch.py`` chooses between them (and cuBLAS, and the torch fallback) and launches them.
"""

from __future__ import annotations

from .backend import HAS_TRITON, tl, triton

__all__ = ["gemv_kernel", "gemm_kernel", "rms_factor"]

if HAS_TRITON:

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, thr_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, rms_ptr, lrb_ptr, lra_ptr,
        K, N, stride_w, B1, B2, B3, K_PER_SPLIT, SPLIT_K, RMS_MASK, RMS_INV_N, RMS_EPS,
        LR_R, LR_N, LR_MASK, stride_lrb, stride_lra,
        HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, HAS_RMS: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, PIPE: tl.constexpr,
        ACC1D: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
        Z_ROWS: tl.constexpr = 64,
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
        offs_r = tl.arange(0, BLOCK_R)
        lr_on = ((LR_MASK >> mat) & 1) != 0  # this block's matrix takes the low-rank term
        r_mask = (offs_r < LR_R) & lr_on
        zacc = tl.zeros([BLOCK_R], dtype=tl.float32)
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
            # ACC1D: the tile's rows are summed as it arrives (a [BLOCK_N] accumulator): fewer registers than
            # the [BLOCK_K, BLOCK_N] one, so more programs (and weight bytes in flight) per multiprocessor
            acc = tl.zeros([1 if ACC1D else BLOCK_K, BLOCK_N], dtype=tl.float32)
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
                if ACC1D:
                    acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0, keep_dims=True)
                else:
                    acc += w.to(tl.float32) * xv[:, None]
            part = tl.sum(acc, axis=0)
        if HAS_LR:
            # the slice's dropped rows through B_p^T ([Z_ROWS, R] tiles), in a loop of its own: x and the
            # thresholds are loaded again (cache hits) in the layout of the factor tile, so the weight loop
            # above stays as it is (inside it, x would change layout through shared memory every tile)
            for z0 in range(0, K_PER_SPLIT, Z_ROWS):
                offs_z = k_start + z0 + tl.arange(0, Z_ROWS)
                z_mask = (offs_z < K) & (z0 + tl.arange(0, Z_ROWS) < K_PER_SPLIT)
                xz = tl.load(x_ptr + offs_z, mask=z_mask, other=0.0).to(tl.float32)
                tz = tl.load(thr_row + offs_z, mask=z_mask, other=float("inf"))
                drop = (tl.abs(xz) <= tz) & z_mask
                lb = tl.load(lrb_ptr + offs_z[:, None] * stride_lrb + (mat * LR_R + offs_r)[None, :],
                             mask=drop[:, None] & r_mask[None, :], other=0.0)
                zacc += tl.sum(lb.to(tl.float32) * xz[:, None], axis=0)
        if ATOMIC:
            tl.atomic_add(ws_ptr + offs_n, part, mask=n_mask, sem="relaxed")
            z_ws = ws_ptr + N + pid_n * BLOCK_R + offs_r  # this column block's [R] low-rank partials
            if HAS_LR:
                tl.atomic_add(z_ws, zacc, mask=r_mask, sem="relaxed")
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                # read the finished sums at L2 (an atomic), then clear them for the next launch
                tot = tl.atomic_add(ws_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_mask, sem="relaxed")
                tl.store(ws_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_mask)
                if HAS_LR:  # + A_p^T z: z = B_p (x * dropped), summed over every slice of K
                    lr_n = n_mask & (offs_n < LR_N)
                    for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):  # [R_CHUNK, BLOCK_N] of A^T at a time
                        offs_j = j0 + tl.arange(0, R_CHUNK)
                        j_mask = (offs_j < LR_R) & lr_on
                        z_j = ws_ptr + N + pid_n * BLOCK_R + offs_j
                        z = tl.atomic_add(z_j, tl.zeros([R_CHUNK], dtype=tl.float32), mask=j_mask, sem="relaxed")
                        tl.store(z_j, tl.zeros([R_CHUNK], dtype=tl.float32), mask=j_mask)
                        la = tl.load(lra_ptr + offs_j[:, None] * stride_lra + offs_n[None, :],
                                     mask=j_mask[:, None] & lr_n[None, :], other=0.0)
                        tot += tl.sum(la.to(tl.float32) * z[:, None], axis=0)
                if HAS_RMS:
                    tot = tot * rms_factor(rms_ptr, mat, RMS_MASK, RMS_INV_N, RMS_EPS)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs_n, tot.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.store(cnt_ptr + pid_n, 0)
        else:
            if HAS_RMS:
                part = part * rms_factor(rms_ptr, mat, RMS_MASK, RMS_INV_N, RMS_EPS)
            if HAS_BIAS:
                part += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, part.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def rms_factor(rms_ptr, mat, RMS_MASK, RMS_INV_N, RMS_EPS):
        """``sqrt(v^2 / n + eps)`` (the RMS of a vector of L2 norm ``v``) for the flagged matrices, else 1."""
        v = tl.load(rms_ptr).to(tl.float32)
        flagged = ((RMS_MASK >> mat) & 1) != 0
        return tl.where(flagged, tl.sqrt(v * v * RMS_INV_N + RMS_EPS), 1.0)

    @triton.jit
    def gemm_kernel(
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
