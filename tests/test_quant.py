"""The quantized-weight layout (wina_convert/quant.py) against element-by-element computations."""

import pytest
import torch

from wina_convert.errors import WinaError
from wina_convert.quant import QuantizedWeight, pack_int4, quantize_rtn, unpack_int4


def test_int4_packing_is_low_nibble_first_and_round_trips():
    g = torch.Generator().manual_seed(0)
    nib = torch.randint(0, 16, (5, 12), generator=g)
    packed = pack_int4(nib)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    for i in range(5):
        for j in range(6):
            assert int(packed[i, j]) == int(nib[i, 2 * j]) + 16 * int(nib[i, 2 * j + 1])
    assert torch.equal(unpack_int4(packed), nib.to(torch.int16))


@pytest.mark.parametrize("bits,group_in,group_out,offsets", [(4, 1, 4, True), (4, 4, 1, False), (4, 2, 1, True),
                                                              (8, 1, 3, False), (8, 4, 1, True)])
def test_dequantize_matches_the_formula_element_by_element(bits, group_in, group_out, offsets):
    g = torch.Generator().manual_seed(bits * 100 + group_in * 10 + group_out)
    n_in, n_out = 8, 12
    if bits == 4:
        codes = torch.randint(0, 16, (n_in, n_out), generator=g)
        qweight = pack_int4(codes)
    else:
        codes = torch.randint(-128, 128, (n_in, n_out), generator=g)
        qweight = codes.to(torch.int8)
    scales = torch.rand(n_in // group_in, n_out // group_out, generator=g).half()
    m = torch.randn(scales.shape, generator=g).half() if offsets else None
    w = QuantizedWeight(qweight, scales, m)
    w.check()
    assert (w.bits, w.in_features, w.out_features, w.group_in, w.group_out) == (bits, n_in, n_out, group_in, group_out)
    got = w.dequantize()
    assert got.shape == (n_out, n_in)
    for o in range(n_out):
        for i in range(n_in):
            q = int(codes[i, o]) - (8 if bits == 4 and not offsets else 0)
            want = float(scales[i // group_in, o // group_out]) * q
            if offsets:
                want += float(m[i // group_in, o // group_out])
            assert float(got[o, i]) == pytest.approx(want, rel=0, abs=1e-6)
    back = QuantizedWeight.from_tensors("lin", w.tensors("lin"))
    assert torch.equal(back.dequantize(), got)
    assert w.nbytes == qweight.numel() * qweight.element_size() + scales.numel() * 2 + (scales.numel() * 2 if offsets else 0)


def test_bad_layouts_are_refused_in_one_line():
    q = pack_int4(torch.zeros(8, 12, dtype=torch.int64))
    with pytest.raises(WinaError, match="do not divide"):
        QuantizedWeight(q, torch.ones(3, 12).half()).check("x")
    with pytest.raises(WinaError, match="not both"):
        QuantizedWeight(q, torch.ones(4, 6).half()).check("x")
    with pytest.raises(WinaError, match="uint8 \\(int4\\) or int8"):
        QuantizedWeight(q.to(torch.int32), torch.ones(8, 3).half()).check("x")
    with pytest.raises(WinaError, match="scales tensors, lin.scales is missing"):
        QuantizedWeight.from_tensors("lin", {"lin.qweight": q})
    with pytest.raises(WinaError, match="even number of outputs"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_rtn_rounds_each_weight_to_its_nearest_grid_point(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 6, generator=g)
    q = quantize_rtn(w, bits, group_size=8, symmetric=symmetric)
    assert (q.group_in, q.group_out, q.bits) == (1, 8, bits) and (q.offsets is None) == symmetric
    got = q.dequantize()
    # the grid of each group, from its stored scale and offset: every weight lands on its nearest point
    levels = torch.arange(-8, 8) if bits == 4 and symmetric else torch.arange(16) if bits == 4 else torch.arange(-127, 128)
    for i in range(6):
        for grp in range(2):
            s = float(q.scales[i, grp])
            m = float(q.offsets[i, grp]) if q.offsets is not None else 0.0
            grid = s * levels.double() + m
            for o in range(grp * 8, grp * 8 + 8):
                nearest = grid[(grid - float(w[o, i])).abs().argmin()]
                assert float(got[o, i]) == pytest.approx(float(nearest), abs=1e-6)
    assert (got - w).abs().max() <= q.scales.float().max() * (0.5 if not symmetric or bits == 8 else 1.0) + 1e-6


def test_rtn_refuses_a_group_that_does_not_divide_the_outputs():
    with pytest.raises(WinaError, match="group size of 5 does not divide the 16 outputs"):
        quantize_rtn(torch.randn(16, 4), 4, 5)
    with pytest.raises(WinaError, match="int4 or int8, not 3 bits"):
        quantize_rtn(torch.randn(16, 4), 3, 8)
