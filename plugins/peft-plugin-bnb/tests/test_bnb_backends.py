"""Backend-level tests: the bnb backends against real bitsandbytes layers on CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from peft_plugin_bnb import Bnb4bitBackend, Bnb8bitBackend  # noqa: E402

# OUT a multiple of 32 so bitsandbytes' CPU repacking applies; IN a multiple of every blocksize
# tested, because bitsandbytes' own forward is wrong on AVX-512 CPUs when a block spans rows
# (test_4bit_blocks_spanning_rows covers the backend on such layers).
IN, OUT = 256, 64


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def make_8bit(lin: nn.Linear, threshold: float = 0.0, has_fp16_weights: bool = False):
    m = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=has_fp16_weights, threshold=threshold)
    m.load_state_dict(lin.state_dict())
    return m.to("cpu")  # bitsandbytes quantizes on .to(device)


def make_4bit(lin: nn.Linear, quant_type="nf4", compress_statistics=True, blocksize=64, dtype=torch.float32):
    m = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=True, compute_dtype=dtype,
        compress_statistics=compress_statistics, quant_type=quant_type,
    )
    m.weight = bnb.nn.Params4bit(
        lin.weight.detach().clone().to(dtype),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=compress_statistics,
        blocksize=blocksize,
        module=m,
    )
    m.bias = nn.Parameter(lin.bias.detach().clone().to(dtype))
    return m.to("cpu")


def step_bound_8bit(w: torch.Tensor) -> torch.Tensor:
    """Largest rounding error LLM.int8() may make per row: half a step of absmax/127, plus
    the float16 staging; we allow one full step."""
    return (w.abs().amax(dim=1, keepdim=True) / 127.0) + w.abs() * 2**-10 + 1e-7


def step_bound_4bit(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block bound for NF4/FP4: the widest gap in either 16-value code book is about a
    third of the block absmax (FP4: 2/3 -> 1), so rounding errs by at most ~0.17 absmax;
    double quantization of the absmax adds ~1%. We allow 0.2 absmax. Blocks run over the
    flattened weight (the last one may be partial)."""
    flat = w.reshape(-1)
    absmax = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % blocksize)).reshape(-1, blocksize).amax(dim=1)
    return (0.2 * absmax.repeat_interleave(blocksize)[: flat.numel()]).reshape(w.shape) + 1e-6


def dequantize_by_hand(m) -> torch.Tensor:
    """The 4-bit weight read straight from its storage: two codes per byte (high nibble first)
    over the flattened weight, each scaled by the absmax of its block of ``blocksize`` codes."""
    state = m.weight.quant_state
    numel = state.shape.numel()
    packed = m.weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    scales = absmax.float().repeat_interleave(state.blocksize)[:numel]
    return (state.code[codes.long()] * scales).reshape(state.shape).to(state.dtype)


FOUR_BIT_CASES = [
    pytest.param("nf4", True, 64, id="nf4-dq-64"),
    pytest.param("fp4", True, 64, id="fp4-dq-64"),
    pytest.param("nf4", False, 128, id="nf4-128"),
    pytest.param("fp4", False, 256, id="fp4-256"),
]


# -- registration / discovery ------------------------------------------------------------


def test_matches_nothing_when_bitsandbytes_never_imported(monkeypatch, plain):
    m = make_4bit(plain)
    monkeypatch.delitem(sys.modules, "bitsandbytes.nn")
    assert not Bnb4bitBackend().matches(m)
    assert not Bnb8bitBackend().matches(m)


# -- 8-bit -------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_8bit_recognise_shape_weight(plain, threshold):
    be = Bnb8bitBackend()
    m = make_8bit(plain, threshold=threshold)
    assert be.matches(m)
    assert not be.matches(plain)
    assert not Bnb4bitBackend().matches(m)
    assert be.layer_shape(m) == (IN, OUT)
    assert be.merge_blocker(m) is None
    w = plain.weight.detach()
    for _ in range(2):  # before and after the first forward (scales move to module.state)
        got = be.get_weight(m)
        assert got.shape == (OUT, IN) and got.dtype == torch.float32
        assert ((got - w).abs() <= step_bound_8bit(w)).all()
        m(torch.randn(3, IN))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_8bit_requantize(plain, threshold):
    be = Bnb8bitBackend()
    m = make_8bit(plain, threshold=threshold)
    x = torch.randn(16, IN)
    m(x)
    torch.manual_seed(1)
    delta = 0.02 * torch.randn(OUT, IN)
    target = be.get_weight(m) + delta
    be.set_weight(m, target)

    # settings kept, weight still int8 and frozen
    assert m.weight.dtype == torch.int8 and not m.weight.requires_grad
    assert m.state.threshold == threshold and m.state.has_fp16_weights is False
    got = be.get_weight(m)
    assert ((got - target).abs() <= step_bound_8bit(target)).all()
    # the forward uses the new weight
    y = m(x)
    assert torch.allclose(y, x @ got.T + plain.bias, atol=1e-4)
    ref = x @ (plain.weight.detach() + delta).T + plain.bias
    assert (y - ref).norm() / ref.norm() < 0.01
    # requantizing a dequantized weight is lossless (merge-then-unmerge with delta 0)
    be.set_weight(m, got)
    assert torch.equal(be.get_weight(m), got)


def test_8bit_fp16_weights_layer_is_written_directly(plain):
    be = Bnb8bitBackend()
    m = make_8bit(plain, has_fp16_weights=True)
    assert be.matches(m)
    assert torch.equal(be.get_weight(m), plain.weight.detach())
    be.set_weight(m, plain.weight.detach() + 1.0)
    assert torch.equal(be.get_weight(m), plain.weight.detach() + 1.0)
    assert m.state.has_fp16_weights


def test_8bit_compute_dtype(plain):
    be = Bnb8bitBackend()
    m = make_8bit(plain)
    assert be.compute_dtype(m) == torch.float32  # follows the float bias
    m.bias = None
    assert be.compute_dtype(m) == torch.float16


# -- 4-bit -------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,compress,blocksize", FOUR_BIT_CASES)
def test_4bit_recognise_shape_weight(plain, quant_type, compress, blocksize):
    be = Bnb4bitBackend()
    m = make_4bit(plain, quant_type, compress, blocksize)
    assert be.matches(m)
    assert not be.matches(plain)
    assert not Bnb8bitBackend().matches(m)
    assert be.layer_shape(m) == (IN, OUT)
    assert be.merge_blocker(m) is None
    assert be.compute_dtype(m) == torch.float32
    w = plain.weight.detach()
    got = be.get_weight(m)
    assert got.shape == (OUT, IN) and got.dtype == torch.float32
    assert ((got - w).abs() <= step_bound_4bit(w, blocksize)).all()
    # the layer computes with exactly this weight
    x = torch.randn(5, IN)
    assert torch.allclose(m(x), x @ got.T + plain.bias, atol=1e-5)


@pytest.mark.parametrize("quant_type,compress,blocksize", FOUR_BIT_CASES)
def test_4bit_requantize(plain, quant_type, compress, blocksize):
    be = Bnb4bitBackend()
    m = make_4bit(plain, quant_type, compress, blocksize)
    torch.manual_seed(1)
    delta = 0.02 * torch.randn(OUT, IN)
    target = be.get_weight(m) + delta
    be.set_weight(m, target)

    st = m.weight.quant_state
    assert (st.quant_type, st.blocksize, st.nested, st.dtype) == (quant_type, blocksize, compress, torch.float32)
    assert m.quant_state is st and m.weight.bnb_quantized and not m.weight.requires_grad
    got = be.get_weight(m)
    assert ((got - target).abs() <= step_bound_4bit(target, blocksize)).all()
    x = torch.randn(16, IN)
    y = m(x)
    assert torch.allclose(y, x @ got.T + plain.bias, atol=1e-5)
    ref = x @ (plain.weight.detach() + delta).T + plain.bias
    assert (y - ref).norm() / ref.norm() < 0.2
    # dequantize -> requantize reproduces the weight up to float rounding of the scales
    be.set_weight(m, got)
    assert torch.allclose(be.get_weight(m), got, atol=1e-4)


@pytest.mark.parametrize("out_features,in_features,quant_type,compress,blocksize", [
    pytest.param(64, 128, "fp4", False, 256, id="block-spans-two-rows"),
    pytest.param(64, 96, "nf4", True, 64, id="blocks-straddle-row-ends"),
    pytest.param(3, 96, "nf4", False, 128, id="partial-last-block"),
])
def test_4bit_blocks_spanning_rows(out_features, in_features, quant_type, compress, blocksize):
    """quantize_4bit cuts the flattened weight into blocks, so a block can span rows. The
    backend reads it back in that order on every CPU (bitsandbytes 0.50's own AVX-512
    dequantization does not: it looks the absmax up per row). The layer's forward is not
    checked here: on AVX-512 CPUs bitsandbytes computes it with that wrong per-row lookup."""
    be = Bnb4bitBackend()
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features)
    with torch.no_grad():  # rows of different size, so a block's absmax fits no other block
        lin.weight.mul_(torch.linspace(0.5, 2.0, out_features).unsqueeze(1))
    m = make_4bit(lin, quant_type, compress, blocksize)
    w = lin.weight.detach()
    got = be.get_weight(m)
    assert got.shape == (out_features, in_features)
    assert torch.equal(got, dequantize_by_hand(m))
    assert ((got - w).abs() <= step_bound_4bit(w, blocksize)).all()
    target = got + 0.01 * w.abs().amax(dim=1, keepdim=True) * torch.randn_like(w)
    be.set_weight(m, target)
    assert m.weight.quant_state.blocksize == blocksize
    got = be.get_weight(m)
    assert torch.equal(got, dequantize_by_hand(m))
    assert ((got - target).abs() <= step_bound_4bit(target, blocksize)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_4bit_half_precision_keeps_dtype(plain, dtype):
    be = Bnb4bitBackend()
    m = make_4bit(plain, dtype=dtype)
    assert be.compute_dtype(m) == dtype
    w = be.get_weight(m)
    assert w.dtype == dtype
    be.set_weight(m, w.float() + 0.01)
    assert m.weight.quant_state.dtype == dtype
    assert be.get_weight(m).dtype == dtype


@pytest.mark.parametrize("compress", [True, False])
def test_4bit_cpu_repacked_layer(plain, compress):
    """On CPUs with AVX512-BF16, bitsandbytes repacks the 4-bit weight in eval mode.
    Simulate that repacking and check the backend still reads and writes it."""
    be = Bnb4bitBackend()
    m = make_4bit(plain, compress_statistics=compress)
    before = be.get_weight(m)
    data, state = F._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    m.weight.data, m.weight.quant_state, m.quant_state = data, state, state
    got = be.get_weight(m)
    assert got.shape == (OUT, IN) and got.dtype == torch.float32
    # the repacked layer keeps its absmax in bf16: 2**-8 relative
    assert torch.allclose(got, before, atol=before.abs().max().item() * 2**-7)
    be.set_weight(m, got + 0.01)
    st = m.weight.quant_state
    assert not getattr(st, "packing_format_for_cpu", False)
    assert (st.quant_type, st.nested, st.dtype) == ("nf4", compress, torch.float32)
    assert ((be.get_weight(m) - (got + 0.01)).abs() <= step_bound_4bit(got + 0.01, 64)).all()
