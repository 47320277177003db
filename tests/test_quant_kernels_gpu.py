"""The quantized gated-linear kernels (runtime/kernels/quant.py) against the torch reference, on fresh random
inputs: int4 / int8, groups along the outputs or the inputs, offsets or not, thresholds dropping 0 / 50 / 90%
of the channels, 1 to 8 rows and prompts, stacked matrices, hidden 576 (SmolLM2; not a multiple of 128).
The reference dequantizes in float32 and multiplies in float64 (``reference_quant_gated_linear``); the CPU
test checks that reference against an independent loop over the quantization formula."""

from __future__ import annotations

import pytest
import torch

from wina_convert.quant import QuantizedWeight, pack_int4, quantize_rtn
from wina_convert.runtime.kernels import backend
from wina_convert.runtime.kernels import quant as qk

needs_gpu = pytest.mark.skipif(not backend.triton_available("cuda"), reason="needs CUDA and triton")


def _weight(n_out: int, n_in: int, bits: int, along_in: bool, offsets: bool, group: int, gen) -> QuantizedWeight:
    """Random codes and scales in the layout (not through a quantizer: every code value occurs)."""
    top = 16 if bits == 4 else 256
    codes = torch.randint(0, top, (n_in, n_out), generator=gen)
    qweight = pack_int4(codes) if bits == 4 else (codes - 128).to(torch.int8)
    shape = (n_in // group, n_out) if along_in else (n_in, n_out // group)
    scales = (torch.rand(shape, generator=gen) * 0.02 + 0.001).half()
    offs = (torch.randn(shape, generator=gen) * 0.05).half() if offsets else None
    return QuantizedWeight(qweight, scales, offs)


def _thresholds(x: torch.Tensor, n_mats: int, drop: float, gen) -> torch.Tensor:
    """Per-matrix thresholds that drop about ``drop`` of the channels of the rows of ``x``."""
    if drop == 0:
        return torch.zeros(n_mats, x.shape[-1])
    level = x.abs().reshape(-1).float().quantile(drop)
    return level * (0.8 + 0.4 * torch.rand(n_mats, x.shape[-1], generator=gen))


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "non-finite (unwritten?) outputs"
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def test_reference_matches_the_formula():
    """The reference equals a direct sum over kept channels of s * q + m (CPU, float64)."""
    gen = torch.Generator().manual_seed(1)
    for bits, along_in, offsets in ((4, False, True), (4, True, False), (8, False, False), (8, True, True)):
        q = _weight(24, 64, bits, along_in, offsets, 8 if along_in else 4, gen)
        x = torch.randn(3, 64, generator=gen, dtype=torch.float64)
        thr = _thresholds(x, 2, 0.5, gen)
        bias = torch.randn(24, generator=gen, dtype=torch.float64)
        got = qk.reference_quant_gated_linear(x, thr, q, [16, 8], bias)
        codes = q.codes().double()  # [in, out]
        want = torch.zeros(3, 24, dtype=torch.float64)
        for r in range(3):
            for o in range(24):
                mat = 0 if o < 16 else 1
                for i in range(64):
                    if abs(x[r, i]) > thr[mat, i]:
                        gi, go = (i // 8, o) if along_in else (i, o // 4)
                        w = float(q.scales[gi, go]) * codes[i, o]
                        if q.offsets is not None:
                            w += float(q.offsets[gi, go])
                        elif bits == 4:
                            pass  # codes() already subtracted 8
                        want[r, o] += w * x[r, i]
                want[r, o] += bias[o]
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


SHAPES = [  # (in, splits)
    (576, [576, 192, 192]),  # SmolLM2 q/k/v
    (576, [1536, 1536]),  # SmolLM2 gate/up
    (1536, [576]),  # SmolLM2 down
    (4096, [4096, 1024, 1024]),
    (1024, [1000]),  # an output count that is no multiple of a block
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("along_in,offsets", [(False, True), (False, False), (True, False), (True, True)])
@pytest.mark.parametrize("n_in,splits", SHAPES)
@pytest.mark.parametrize("drop", [0.0, 0.5, 0.9])
def test_kernel_batch1(bits, along_in, offsets, n_in, splits, drop):
    gen = torch.Generator().manual_seed(hash((bits, along_in, offsets, n_in, drop)) % 2**31)
    n_out = sum(splits)
    group = 32 if along_in else (64 if n_out % 128 else 128)
    if not along_in and any(s % group for s in splits):
        group = 8
    q = _weight(n_out, n_in, bits, along_in, offsets, group, gen)
    x = torch.randn(1, 1, n_in, generator=gen)
    thr = _thresholds(x, len(splits), drop, gen)
    bias = torch.randn(n_out, generator=gen) if n_in == 1024 else None
    ref = qk.reference_quant_gated_linear(x.double(), thr, q, splits, None if bias is None else bias.double())
    qc = QuantizedWeight(q.qweight.cuda(), q.scales.cuda(), None if q.offsets is None else q.offsets.cuda())
    for _ in range(2):  # the second launch reuses the workspace the first one left zeroed
        y = qk.quant_gated_linear(x.cuda().bfloat16(), thr.cuda(), qc.qweight, qc.scales, qc.offsets, splits,
                                  None if bias is None else bias.cuda().bfloat16())
        assert y.shape == (1, 1, n_out) and y.dtype == torch.bfloat16
        assert _rel(y.cpu(), ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("along_in", [False, True])
@pytest.mark.parametrize("rows", [2, 3, 4, 8, 17])
@pytest.mark.parametrize("drop", [0.0, 0.5, 0.9])
def test_kernel_rows(bits, along_in, rows, drop):
    """A few rows (the GEMV kernel, union of the masks, each row its own) and a prompt (dequantized cuBLAS)."""
    gen = torch.Generator().manual_seed(rows * 7 + bits)
    splits = [1536, 1536]
    q = _weight(sum(splits), 576, bits, along_in, True, 32 if along_in else 128, gen)
    x = torch.randn(rows, 1, 576, generator=gen)
    thr = _thresholds(x, 2, drop, gen)
    ref = qk.reference_quant_gated_linear(x.double(), thr, q, splits)
    y = qk.quant_gated_linear(x.cuda().bfloat16(), thr.cuda(), q.qweight.cuda(), q.scales.cuda(),
                              q.offsets.cuda(), splits)
    assert y.shape == (rows, 1, sum(splits))
    assert _rel(y.cpu(), ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_inf_thresholds_and_poisoned_output():
    """-inf keeps every channel (dense through the kernel), +inf drops every one (zeros, bias only); each output
    is written (the poisoned buffer of a previous result never shows through)."""
    gen = torch.Generator().manual_seed(5)
    q = _weight(3072, 4096, 4, False, True, 128, gen)
    qc = QuantizedWeight(q.qweight.cuda(), q.scales.cuda(), q.offsets.cuda())
    x = torch.randn(1, 4096, generator=gen)
    dense = (q.dequantize(torch.float64) @ x.double().reshape(-1)).reshape(1, -1)
    out = torch.full((1, 3072), float("nan"), device="cuda", dtype=torch.bfloat16)
    thr = torch.full((1, 4096), float("-inf"), device="cuda")
    assert qk._kernel_path(x.cuda().bfloat16(), qc, thr, [3072], None, out, None)
    assert _rel(out.cpu(), dense) < 1e-2
    bias = torch.randn(3072, generator=gen).cuda().bfloat16()
    y = qk.quant_gated_linear(x.cuda().bfloat16(), torch.full((4096,), float("inf"), device="cuda"),
                              qc.qweight, qc.scales, qc.offsets, None, bias)
    assert torch.equal(y.reshape(-1), bias)


@pytest.mark.gpu
@needs_gpu
def test_rtn_weights_and_packing():
    """quantize_rtn's weights (int4 asymmetric g128, int8 symmetric g128) packed as q/k/v: the kernel equals the
    reference of the packed weight, and the packed weight equals the members' dequantized matrices."""
    gen = torch.Generator().manual_seed(9)
    ws = [torch.randn(n, 576, generator=gen) * 0.02 for n in (576, 192, 192)]
    for bits in (4, 8):
        parts = [quantize_rtn(w, bits, 64) for w in ws]
        packed = qk.pack_quantized(parts)
        assert torch.equal(packed.dequantize(), torch.cat([p.dequantize() for p in parts]))
        x = torch.randn(1, 576, generator=gen)
        thr = _thresholds(x, 3, 0.5, gen)
        ref = qk.reference_quant_gated_linear(x.double(), thr, packed, [576, 192, 192])
        pc = QuantizedWeight(packed.qweight.cuda(), packed.scales.cuda(),
                             None if packed.offsets is None else packed.offsets.cuda())
        y = qk.quant_gated_linear(x.cuda().bfloat16(), thr.cuda(), pc.qweight, pc.scales, pc.offsets, [576, 192, 192])
        assert _rel(y.cpu(), ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_and_compile():
    """The kernel replays inside a CUDA graph and runs as one opaque operator under torch.compile."""
    gen = torch.Generator().manual_seed(3)
    q = _weight(2048, 1024, 4, False, True, 128, gen)
    qc = QuantizedWeight(q.qweight.cuda(), q.scales.cuda(), q.offsets.cuda())
    thr = torch.full((1, 1024), 0.5, device="cuda")
    x = torch.randn(1, 1024, device="cuda").bfloat16()
    f = lambda x: qk.quant_gated_linear_op(x * 1, thr, qc, [2048])  # noqa: E731
    want = qk.reference_quant_gated_linear(x.double().cpu(), thr.cpu(), q, [2048])
    cf = torch.compile(f, fullgraph=True)
    assert _rel(cf(x).cpu(), want) < 1e-2
    f(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = f(x)
    x.copy_(torch.randn(1, 1024, device="cuda").bfloat16())
    g.replay()
    want = qk.reference_quant_gated_linear(x.double().cpu(), thr.cpu(), q, [2048])
    assert _rel(y.cpu(), want) < 1e-2
