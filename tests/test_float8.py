"""Float8 linear layers (float8.py) against an emulation oracle written out here.

On CPU, torch._scaled_mm equals dequantize-then-matmul bit for bit, so the oracle is
exact: quantize each operand with the documented rules (re-implemented below, not
imported), dequantize, matmul in float32. What is checked:
  * exactness: the forward output and both gradients of Float8Matmul / Float8Linear
    equal the oracle bit for bit, for both recipes;
  * scales: the tensorwise inverse scale is amax / finfo.max (to one float32 rounding),
    rowwise scales are powers of two, casts saturate (e5m2 too), zeros stay zeros;
  * numerics: SQNR of the output and both gradients against float64 on Gaussian data,
    and an outlier row that ruins tensorwise but not rowwise;
  * the CUDA layout rules of _scaled_mm, enforced on CPU (16-divisibility, row-major
    first operand, column-major second, scale shapes, never e5m2 x e5m2);
  * convert_to_float8 on the debug Llama (meta device, same Parameter objects);
  * training through train.main: float8 tracks float32 over 100 steps, FSDP 2 tracks
    the single-process float8 run; a bad recipe is refused;
  * composition: FSDP's float8 all-gather (a quarter of the float32 bytes, bitwise the
    same forward and training), TP 2 / 4 track the single-process float8 run (tensorwise
    scales over the whole logical tensor), layers too small once TP-sharded are skipped;
  * async TP with float8 (tensor_parallel.py's rings, float8.Float8RingMatmuls): every
    output and gradient within a derived float32-reordering bound of the sync float8
    path, the rings moving float8 bytes, tensorwise scales equal on every rank, training
    equal to sync TP float8 and the single process (tp 2; FSDP 2 x TP 2 with the float8
    all-gather);
  * on a GPU only: Float8Linear on CUDA against the emulation.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.distributed as dist
from torch import nn

import float8
import llama
import config
import train
from distributed import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")


# ---------------------------------------------------------------------------------------
# The oracle: the documented quantization rules, written out independently of float8.py


def fake_quant(x: torch.Tensor, dtype: torch.dtype, dim: int | None = None, pow2: bool = False) -> torch.Tensor:
    """x -> float8 -> float32, as float8.py's docstring says: amax over the tensor
    (dim None) or along `dim` (the contraction dim); scale = finfo.max / amax in float64,
    stored in float32; rowwise rounds the scale down to a power of two (done exactly
    here, in float64, with frexp); saturating cast; dequantize with the float32 inverse
    scale, x_f8.float() * (1 / scale)."""
    fmax = torch.finfo(dtype).max
    xf = x.detach().float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    scale64 = fmax / amax.double().clamp(min=1e-12)
    if pow2:
        mantissa, exponent = torch.frexp(scale64)  # scale64 = m * 2^e, m in [0.5, 1)
        scale = torch.ldexp(torch.ones_like(scale64), exponent - 1).float()  # 2^floor(log2 scale64)
    else:
        scale = scale64.float()
    x_f8 = torch.clamp(xf * scale, -fmax, fmax).to(dtype)
    return x_f8.float() * scale.reciprocal()


def emulate(x: torch.Tensor, w: torch.Tensor, go: torch.Tensor, recipe: str):
    """(out, grad_x, grad_w) of out = x @ w^T with every GEMM operand fake-quantized;
    rowwise results rounded to bf16 (CUDA's rowwise _scaled_mm writes no float32:
    float8.SCALED_MM_OUT)."""
    if recipe == "tensorwise":
        xq, wq, gq = fake_quant(x, E4M3), fake_quant(w, E4M3), fake_quant(go, E5M2)
        return xq @ wq.t(), gq @ wq, gq.t() @ xq
    out = fake_quant(x, E4M3, dim=1, pow2=True) @ fake_quant(w, E4M3, dim=1, pow2=True).t()  # over K
    grad_x = fake_quant(go, E4M3, dim=1, pow2=True) @ fake_quant(w, E4M3, dim=0, pow2=True)  # over N
    grad_w = fake_quant(go, E4M3, dim=0, pow2=True).t() @ fake_quant(x, E4M3, dim=0, pow2=True)  # over M
    return tuple(t.bfloat16().float() for t in (out, grad_x, grad_w))


def _run_matmul(x, w, go, recipe):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = float8.Float8Matmul.apply(x, w, recipe, None)
    out.backward(go)
    return out.detach(), x.grad, w.grad


def _gaussian(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * K**-0.5,
            torch.randn(M, N, generator=g))


def sqnr_db(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return 10 * math.log10((ref.norm() ** 2 / (got.double() - ref).norm() ** 2).item())


# ---------------------------------------------------------------------------------------
# 1. Exactness against the oracle


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("M, K, N", [(64, 48, 32), (128, 256, 192)])
def test_matmul_equals_the_emulation_bitwise(recipe, M, K, N):
    x, w, go = _gaussian(M, K, N)
    x[3] *= 50  # rows (and columns, below) of different ranges: per-row scales differ
    w[:, 5] *= 0.01
    go[:, 7] *= 1e3
    got = _run_matmul(x, w, go, recipe)
    ref = emulate(x, w, go, recipe)
    for name, a, b in zip(("out", "grad_x", "grad_w"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.equal(a, b), (recipe, name, (a - b).abs().max().item())
    # The oracle is not trivially satisfied: float8 is far from the float32 matmul.
    assert not torch.allclose(got[0], x @ w.t(), rtol=1e-3, atol=1e-3)


def test_the_oracle_tells_the_recipes_apart():
    """Exactness would mean little if the two recipes (or e4m3 vs e5m2 gradients) gave
    the same numbers: each recipe's result differs from the other's oracle."""
    x, w, go = _gaussian(64, 48, 32)
    for recipe, other in (("tensorwise", "rowwise"), ("rowwise", "tensorwise")):
        got = _run_matmul(x, w, go, recipe)
        for a, b in zip(got, emulate(x, w, go, other)):
            assert not torch.equal(a, b)


@pytest.mark.parametrize("recipe", RECIPES)
def test_float8_linear_equals_the_emulation_bitwise(recipe):
    """Float8Linear on a (batch, seq, dim) input: the tokens are flattened into M."""
    torch.manual_seed(0)
    lin = float8.Float8Linear(64, 48, bias=False)
    lin.recipe = recipe
    x = torch.randn(2, 32, 64, requires_grad=True)
    go = torch.randn(2, 32, 48)
    out = lin(x)
    out.backward(go)
    assert out.shape == (2, 32, 48)
    ref_out, ref_gx, ref_gw = emulate(x.detach().reshape(64, 64), lin.weight.detach(), go.reshape(64, 48), recipe)
    assert torch.equal(out.detach().reshape(64, 48), ref_out)
    assert torch.equal(x.grad.reshape(64, 64), ref_gx)
    assert torch.equal(lin.weight.grad, ref_gw)


def _autocast_bf16(recipe):
    """Float8Linear under CPU autocast (train.py's bfloat16 path without FSDP): float32
    weight and input, bf16 compute. Returns ours and the emulation from the bf16 inputs
    (float32 GEMMs, rounded to bf16)."""
    torch.manual_seed(0)
    lin = float8.Float8Linear(64, 48, bias=False)
    lin.recipe = recipe
    x = torch.randn(64, 64, requires_grad=True)
    go = torch.randn(64, 48).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    out.backward(go)
    ref = emulate(x.detach().to(torch.bfloat16), lin.weight.detach().to(torch.bfloat16), go, recipe)
    got = (out.detach(), x.grad, lin.weight.grad)
    return got, tuple(r.to(torch.bfloat16).to(g.dtype) for r, g in zip(ref, got))


@pytest.mark.parametrize("recipe", RECIPES)
def test_autocast_bf16_matches_the_emulation(recipe):
    """Under CPU autocast _scaled_mm would round the dequantized operands to bf16 before
    multiplying; Float8Linear turns autocast off around its GEMMs (the input is already
    bf16), so forward and backward equal the emulation bit for bit."""
    (out, gx, gw), (ref_out, ref_gx, ref_gw) = _autocast_bf16(recipe)
    assert out.dtype == torch.bfloat16 and gx.dtype == gw.dtype == torch.float32
    assert torch.equal(out, ref_out)
    assert torch.equal(gx, ref_gx) and torch.equal(gw, ref_gw)


# ---------------------------------------------------------------------------------------
# 2. Scales


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_tensorwise_inverse_scale_is_amax_over_max(dtype):
    """inv = 1 / float32(fmax / amax): amax / fmax up to one float32 rounding (the
    reciprocal of a rounded number is not always the rounded quotient: ~1 in 4 differ
    in the last bit, measured), and the largest element maps to +-fmax exactly."""
    fmax = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(0)
    for i in range(200):
        x = torch.randn(16, 32, generator=gen) * 10.0 ** (12 * i / 199 - 6)  # amax from ~1e-6 to ~1e6
        x_f8, inv = float8.to_float8(x, dtype)
        amax = x.abs().max()
        assert inv.dtype == torch.float32 and inv.dim() == 0
        assert torch.equal(inv, (fmax / amax.double()).float().reciprocal()), i  # the documented rule
        assert abs(inv.double().item() / (amax.double().item() / fmax) - 1) <= 2**-23, i
        peak = x_f8.float().flatten()[x.abs().argmax()]
        assert peak.abs().item() == fmax, (i, peak)


@pytest.mark.parametrize("dim", [0, 1])
def test_rowwise_scales_are_powers_of_two(dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen) * torch.logspace(-4, 4, 64 if dim == 1 else 48).reshape(
        (-1, 1) if dim == 1 else (1, -1))
    x_f8, inv = float8.to_float8(x, E4M3, dim=dim, pow2=True)
    assert inv.shape == ((64, 1) if dim == 1 else (1, 48)) and inv.dtype == torch.float32
    mantissa, _ = torch.frexp(inv)
    assert torch.all(mantissa == 0.5), inv  # exactly 2^k
    # The largest power of two with amax * scale <= 448: each slice uses (448/2, 448].
    peak = x_f8.float().abs().amax(dim=dim, keepdim=True)
    amax = x.abs().amax(dim=dim, keepdim=True)
    assert torch.all((amax / inv > 224) & (amax / inv <= 448))
    assert torch.all((peak >= 224) & (peak <= 448))
    # Dequantizing by the power of two is exact: x_f8 * inv loses nothing more.
    assert torch.equal(x_f8.float() * inv, (x_f8.float().double() * inv.double()).float())
    # Edge: amax just above 3.5 * 2^m makes the float32 scale fall one ulp below 2^k and
    # float32 log2 round up to k: the scale is then 2^k, not 2^(k-1) ("rounded down"
    # holds to one ulp), and the saturating cast keeps the result at 448.
    edge = torch.zeros(1, 16)
    edge[0, 0] = torch.nextafter(torch.tensor(3.5), torch.tensor(4.0))
    e_f8, e_inv = float8.to_float8(edge, E4M3, dim=1, pow2=True)
    assert torch.frexp(e_inv)[0].item() == 0.5 and e_f8[0, 0].float().item() == 448.0


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("dim", [None, 1])
def test_casts_saturate(monkeypatch, dtype, dim):
    """A value beyond the format's max (here: a scale computed from an amax 1000x too
    small) maps to +-max, never inf or NaN; for e5m2 a plain cast would give inf."""
    fmax = torch.finfo(dtype).max
    if dtype == E5M2:
        assert torch.isinf(torch.tensor([1e6]).to(E5M2).float()).all()  # why the clamp is needed
    true_amax = float8._amax
    monkeypatch.setattr(float8, "_amax", lambda x, d, g: true_amax(x, d, g) / 1000)
    x = torch.randn(16, 32)
    x[0, 0], x[1, 1] = 100.0, -100.0
    x_f8, inv = float8.to_float8(x, dtype, dim=dim)
    got = x_f8.float()
    assert torch.isfinite(got).all()
    assert got[0, 0].item() == fmax and got[1, 1].item() == -fmax
    assert got.abs().max().item() == fmax


@pytest.mark.parametrize("recipe", RECIPES)
def test_zeros_give_zeros_not_nan(recipe):
    for dtype in (E4M3, E5M2):
        for dim in (None, 0, 1):
            z_f8, inv = float8.to_float8(torch.zeros(32, 16), dtype, dim=dim)
            assert torch.equal(z_f8.float(), torch.zeros(32, 16)) and torch.isfinite(inv).all() and (inv > 0).all()
    x, w, go = _gaussian(32, 32, 16)
    for zeros in ("x", "w", "go", "row"):
        xx, ww, gg = x.clone(), w.clone(), go.clone()
        if zeros == "row":
            xx[5] = 0  # one zero row among others: rowwise scales it alone
        else:
            {"x": xx, "w": ww, "go": gg}[zeros].zero_()
        got = _run_matmul(xx, ww, gg, recipe)
        for name, a, b in zip(("out", "grad_x", "grad_w"), got, emulate(xx, ww, gg, recipe)):
            assert torch.isfinite(a).all(), (zeros, name)
            assert torch.equal(a, b), (zeros, name)
        if zeros == "x":
            assert torch.equal(got[0], torch.zeros(32, 16)) and torch.equal(got[2], torch.zeros(16, 32))
        if zeros == "row":
            assert torch.equal(got[0][5], torch.zeros(16))


# ---------------------------------------------------------------------------------------
# 3. Numerics: signal-to-quantization-noise ratio against float64
#
# Measured (256 x 512 x 256, Gaussian, seeds 0-2): forward 28.5 dB both recipes; the
# tensorwise gradients 24.6 dB (go in e5m2: one mantissa bit less, ~6 dB less on that
# operand), rowwise gradients 28.5 dB. Rounding to 3 mantissa bits gives ~32 dB per
# operand, ~29 dB for a product of two. Bounds: ~1.5 dB below.

SQNR_BOUNDS = {"tensorwise": (27.0, 23.0, 23.0), "rowwise": (27.0, 27.0, 27.0)}  # out, grad_x, grad_w


@pytest.mark.parametrize("recipe", RECIPES)
def test_sqnr_against_float64(recipe):
    x, w, go = _gaussian(256, 512, 256, seed=1)
    out, grad_x, grad_w = _run_matmul(x, w, go, recipe)
    xd, wd, gd = x.double(), w.double(), go.double()
    got = (sqnr_db(out, xd @ wd.t()), sqnr_db(grad_x, gd @ wd), sqnr_db(grad_w, gd.t() @ xd))
    for name, value, bound in zip(("out", "grad_x", "grad_w"), got, SQNR_BOUNDS[recipe]):
        assert value >= bound, (recipe, name, got)
    assert max(got) < 31, got  # and not float32: the test can see float8 is in use
    if recipe == "tensorwise":
        assert got[1] < got[0] - 2 and got[2] < got[0] - 2, got  # e5m2 gradients: coarser


def test_an_outlier_row_hurts_tensorwise_not_rowwise():
    """One activation row 1e5x larger: tensorwise scales every row by the outlier's amax,
    so the other rows' values (~1 -> ~1e-3) fall below e4m3's smallest normal (2^-6)
    and mostly below its smallest subnormal (2^-9): their bits are gone. Rowwise gives
    each row its own scale. SQNR of the other rows' outputs, measured: tensorwise 5.7 dB,
    rowwise 28.5 dB (at 1e4: 24.7 vs 28.5; at 1e3 both ~28.5, since e4m3's normal numbers
    span 2^-6 to 448, ~15 binades). The whole-tensor SQNR hides it (tensorwise 28.5,
    rowwise 28.2 dB): the outlier row dominates the signal."""
    x, w, go = _gaussian(256, 512, 256)
    x[0] *= 1e5
    ref = (x.double() @ w.double().t())[1:]
    tw = sqnr_db(_run_matmul(x, w, go, "tensorwise")[0][1:], ref)
    rw = sqnr_db(_run_matmul(x, w, go, "rowwise")[0][1:], ref)
    assert rw >= 27 and tw <= 10, (tw, rw)


# ---------------------------------------------------------------------------------------
# 4. _scaled_mm's CUDA layout rules, enforced on CPU


def test_dims_not_divisible_by_16_raise():
    a = torch.zeros(32, 24).to(E4M3)
    one = torch.ones(())
    with pytest.raises(ValueError, match="divisible by 16"):  # K = 24
        float8.scaled_mm(a, one, torch.zeros(32, 24).to(E4M3).t(), one, torch.float32)
    with pytest.raises(ValueError, match="divisible by 16"):  # N = 24
        float8.scaled_mm(torch.zeros(32, 32).to(E4M3), one, torch.zeros(24, 32).to(E4M3).t(), one, torch.float32)
    for recipe in RECIPES:
        for k, n in ((24, 32), (32, 24)):
            lin = float8.Float8Linear(k, n, bias=False)
            lin.recipe = recipe
            with pytest.raises(ValueError, match="divisible by 16"):
                lin(torch.randn(32, k))
        lin = float8.Float8Linear(32, 32, bias=False)
        lin.recipe = recipe
        for shape in ((17, 32), (1, 17, 32), (3, 8, 32)):  # 17 and 24 tokens
            with pytest.raises(ValueError, match="tokens per matmul"):
                lin(torch.randn(*shape))
        lin(torch.randn(2, 8, 32))  # 16 tokens: fine


@pytest.mark.parametrize("recipe", RECIPES)
def test_scaled_mm_operands_have_the_cuda_layout(monkeypatch, recipe):
    """Spy on torch._scaled_mm: three calls per forward + backward, the first operand
    row-major contiguous, the second column-major, K and N divisible by 16, never e5m2
    x e5m2, scales float32: scalars (tensorwise) or (M, 1) and (1, N) (rowwise)."""
    calls = []
    real = torch._scaled_mm

    def spy(a, b, scale_a, scale_b, *args, **kwargs):
        calls.append(dict(a_shape=tuple(a.shape), a_contig=a.is_contiguous(), b_shape=tuple(b.shape),
                          b_col=b.stride(0) == 1 and b.stride(1) == b.shape[0],
                          dtypes=(a.dtype, b.dtype), sa=(tuple(scale_a.shape), scale_a.dtype, scale_a.is_contiguous()),
                          sb=(tuple(scale_b.shape), scale_b.dtype, scale_b.is_contiguous()),
                          out_dtype=kwargs.get("out_dtype"), fast_accum=bool(kwargs.get("use_fast_accum", False))))
        return real(a, b, scale_a, scale_b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    M, K, N = 64, 48, 32
    lin = float8.Float8Linear(K, N, bias=False)
    lin.recipe = recipe
    x = torch.randn(M, K, requires_grad=True)
    lin(x).backward(torch.randn(M, N))
    # out = x @ W^T, grad_x = go @ W, grad_W = go^T @ x
    assert [(c["a_shape"], c["b_shape"]) for c in calls] == [((M, K), (K, N)), ((M, N), (N, K)), ((N, M), (M, K))]
    go_dtype = E5M2 if recipe == "tensorwise" else E4M3
    assert [c["dtypes"] for c in calls] == [(E4M3, E4M3), (go_dtype, E4M3), (go_dtype, E4M3)]
    assert [c["fast_accum"] for c in calls[1:]] == [False, False]  # gradients accumulate in full precision
    for c in calls:
        assert c["a_contig"] and c["b_col"], c
        assert c["a_shape"][1] % 16 == 0 and c["b_shape"][1] % 16 == 0, c
        assert c["out_dtype"] == (torch.float32 if recipe == "tensorwise" else torch.bfloat16)  # CUDA's rules
        rows, cols = c["a_shape"][0], c["b_shape"][1]
        if recipe == "tensorwise":
            assert c["sa"] == ((), torch.float32, True) and c["sb"] == ((), torch.float32, True), c
        else:
            assert c["sa"] == ((rows, 1), torch.float32, True) and c["sb"] == ((1, cols), torch.float32, True), c


def test_cuda_output_dtype_rules_are_enforced_on_cpu():
    """check_scaled_mm refuses what CUDA's _scaled_mm rejects (CPU's would run it): float32
    output with rowwise scales, float64 output, e5m2 x e5m2, a row-major second operand,
    scales of no known shape; mm_out_dtype picks what is allowed."""
    M, K, N = 32, 16, 16
    a = torch.randn(M, K).to(E4M3)
    b = torch.randn(N, K).to(E4M3).t()  # column-major (K, N)
    one, rows, cols = torch.ones(()), torch.ones(M, 1), torch.ones(1, N)
    assert float8.check_scaled_mm(a, one, b, one, torch.float32) == "tensorwise"
    assert float8.check_scaled_mm(a, rows, b, cols, torch.bfloat16) == "rowwise"
    bad = [((a, rows, b, cols, torch.float32), "rejects torch.float32 output with rowwise"),
           ((a, one, b, one, torch.float64), "rejects torch.float64 output with tensorwise"),
           ((a.view(E5M2), one, b.view(E5M2), one, torch.float32), "e5m2 x e5m2"),
           ((a, one, b.contiguous(), one, torch.float32), "column-major"),
           ((a, rows[:4], b, cols, torch.bfloat16), "neither tensorwise"),
           ((a[:, :8], one, b[:8], one, torch.float32), "divisible by 16")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            float8.check_scaled_mm(*args)
    assert [float8.mm_out_dtype("tensorwise", d) for d in (torch.float32, torch.bfloat16, torch.float64)] == [
        torch.float32, torch.bfloat16, torch.float32]
    assert [float8.mm_out_dtype("rowwise", d) for d in (torch.float32, torch.bfloat16, torch.float64)] == [
        torch.bfloat16, torch.bfloat16, torch.bfloat16]


class _ScaledMMDtypes(TorchDispatchMode):
    """The out_dtype of every aten._scaled_mm call made while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_mm.default:
            self.seen.append((kwargs or {}).get("out_dtype", args[6] if len(args) > 6 else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_gemm_asks_for_an_output_cuda_allows(recipe, dtype):
    """A Float8Linear's three GEMMs, and async TP's ring GEMMs, in every compute dtype: each
    _scaled_mm call asks for an output dtype CUDA accepts for its scaling, and the result
    comes back in the compute dtype."""
    M, K, N = 32, 48, 64
    lin = float8.Float8Linear(K, N, bias=False, dtype=dtype)
    lin.recipe = recipe
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    with _ScaledMMDtypes() as spy:
        out = lin(x)
        out.backward(torch.randn(M, N, dtype=dtype))
        ring = lin.ring_matmuls(dtype)
        xp, xs = ring.pack(x.detach().view(1, M, K), grad=False, seq_sharded=False)
        gp, gs = ring.pack(torch.randn(1, M, N, dtype=dtype), grad=True, seq_sharded=False)
        w = ring.weight(lin.weight.detach())
        ring_out = [ring.out(xp, xs, w), ring.grad_x(gp, gs, w), ring.grad_w(gp, gs, xp, xs)]
    assert len(spy.seen) == 6
    assert all(d in float8.SCALED_MM_OUT[recipe] for d in spy.seen), spy.seen
    assert out.dtype == x.grad.dtype == lin.weight.grad.dtype == ring_out[0].dtype == ring_out[1].dtype == dtype


# ---------------------------------------------------------------------------------------
# 5. convert_to_float8


def _linears(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_convert_swaps_every_block_linear_of_the_debug_llama_on_meta(recipe):
    args = llama.model_args("debug")
    model = llama.build_model(args, "meta")
    before = list(model.named_parameters())
    skipped = float8.convert_to_float8(model, recipe)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(before, after))  # the same Parameter objects
    kinds = _linears(model)
    expected = {f"layers.{i}.{sub}": float8.Float8Linear for i in range(args.n_layers)
                for sub in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert kinds == {**expected, "output": nn.Linear}
    assert [n for n, _ in skipped] == ["output"] and "excluded" in skipped[0][1]
    for name, cls in expected.items():
        m = model.get_submodule(name)
        assert m.recipe == recipe and m.weight.is_meta and m.bias is None


def test_convert_on_meta_then_materialize_and_init():
    """train.py's order: swap on meta, then materialize and init. The weights are the
    global ones (init by name, so the swap changes nothing) and the forward runs 7
    float8 GEMMs per block: close to float32 (the blocks' residual contributions are
    small at init), but not float32."""
    args = llama.model_args("debug", dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=256)
    model = llama.build_model(args, "meta")
    float8.convert_to_float8(model, "rowwise")
    llama.materialize(model, "cpu")
    llama.init_weights(model, args, 0)
    ref = llama.build_model(args, "cpu")
    llama.init_weights(ref, args, 0)
    for (n, p), (m, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert n == m and torch.equal(p, q), n
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(tokens), ref(tokens)
    assert not torch.equal(got, want) and sqnr_db(got, want) > 25, sqnr_db(got, want)  # measured 66 dB


def test_convert_skips_with_reasons_and_rejects_unknown_recipes():
    model = nn.Sequential()
    model.add_module("ok", nn.Linear(32, 48, bias=False))
    model.add_module("biased", nn.Linear(32, 32, bias=True))
    model.add_module("odd_k", nn.Linear(24, 32, bias=False))
    model.add_module("odd_n", nn.Linear(32, 40, bias=False))
    inner = nn.Module()
    inner.output = nn.Linear(32, 32, bias=False)
    model.add_module("head", inner)
    skipped = dict(float8.convert_to_float8(model))
    assert _linears(model) == {"ok": float8.Float8Linear, "biased": nn.Linear, "odd_k": nn.Linear,
                               "odd_n": nn.Linear, "head.output": nn.Linear}
    assert set(skipped) == {"biased", "odd_k", "odd_n", "head.output"}
    assert "bias" in skipped["biased"]
    assert "(32, 24)" in skipped["odd_k"] and "(40, 32)" in skipped["odd_n"]
    assert "excluded" in skipped["head.output"]
    assert float8.convert_to_float8(model) == [(n, skipped[n]) for n in ("biased", "odd_k", "odd_n", "head.output")]
    assert _linears(model)["ok"] is float8.Float8Linear  # converting twice changes nothing
    with pytest.raises(ValueError, match="blockwise"):
        float8.convert_to_float8(nn.Linear(32, 32, bias=False), "blockwise")


def test_bad_recipe_in_the_config_names_the_key():
    with pytest.raises(ValueError, match=r"float8\.recipe") as info:
        config.load_config(os.path.join(ROOT, "configs/debug.yaml"), ["float8.enabled=true", "float8.recipe=blockwise"])
    assert "blockwise" in str(info.value) and "rowwise" in str(info.value)
    with pytest.raises(ValueError, match=r"float8\.recipe='blockwise'"):  # the command line, before any work
        train.main(["--config", os.path.join(ROOT, "configs/debug.yaml"), "float8.recipe=blockwise"])


# ---------------------------------------------------------------------------------------
# 6. Training through train.main
#
# A constant learning rate after warmup (min_lr_ratio=1), so runs of different lengths
# share their first steps. 4 sequences x 32 tokens: 128 tokens per matmul, 64 per rank with FSDP 2.


def _train_argv(run_dir: str, *overrides: str) -> list[str]:
    from test_train import TINY

    return ["--config", os.path.join(ROOT, "configs/debug.yaml"), *TINY, "training.dtype=float32",
            "training.batch_size=4", "training.micro_batch_size=4", "training.min_lr_ratio=1.0",
            "run.peak_flops=1e12", f"run.dir={run_dir}", f"data.cache_dir={os.path.join(ROOT, '.cache/data')}",
            *overrides]


def _train(rank: int, world: int, argv: list[str]) -> list[float]:
    return [r["loss"] for r in train.main(argv)]


FLOAT8 = {None: [], "tensorwise": ["float8.enabled=true", "float8.recipe=tensorwise"],
          "rowwise": ["float8.enabled=true", "float8.recipe=rowwise"]}
STEPS = 100


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory) -> dict:
    return {recipe: _train(0, 1, _train_argv(str(tmp_path_factory.mktemp(str(recipe))), f"training.steps={STEPS}",
                                             *opts)) for recipe, opts in FLOAT8.items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_float8_training_tracks_float32(long_runs, recipe):
    """100 AdamW steps of the tiny Llama, float32 master weights, every block linear in
    float8, against the same run in float32. Measured (seeds 0, 1, 2): final loss
    relative difference tensorwise 1.8e-4 / 3.6e-4 / 1.1e-3, rowwise 4.1e-4 / 1.4e-3 /
    5.4e-4; largest over all steps 1.9e-3 / 1.7e-3 / 4.0e-3 and 2.3e-3 / 1.4e-3 / 2.2e-3."""
    ref, got = long_runs[None], long_runs[recipe]
    assert len(got) == STEPS
    assert got[0] != ref[0]  # float8 is in use (the first loss already differs)
    assert sum(got[-10:]) / 10 < got[0] - 1.5, got  # it learns (8.98 -> ~6.3)
    assert abs(got[-1] - ref[-1]) <= 5e-3 * ref[-1], (recipe, got[-1], ref[-1])
    assert max(abs(a - b) / b for a, b in zip(got, ref)) <= 1e-2, recipe


# The parity tests below train with SGD: AdamW divides each update by the root of its
# second moment, so a float8 rounding flip (a value on a rounding boundary, moved by a
# float32 summation-order difference) in a tiny gradient becomes an lr-sized update, and
# a few such flips grew a 1e-7 difference to 3.4e-5 within 10 steps on an AMD EPYC (Zen 5)
# while an Intel machine stayed at 7e-6. With SGD an update is proportional to its
# gradient, so a flip stays a flip-sized difference, on any CPU.
#
# Bounds, all relative loss differences over 10 steps:
#   LOSS_ULPS: a float32 loss of ~9 is rounded to 2^-24 x 16 ~ 1e-6 absolute, 1.1e-7
#     relative; summation-order differences between layouts move it by a few ulps
#     (measured at most 1 ulp: 1.1e-7, FSDP 2 bitwise equal). 10 ulps: 1e-6.
#   The float8 error itself (float8 vs float32, same steps) measured 4.5e-6 - 1.0e-5
#     (SGD; e4m3 keeps 3 mantissa bits, 2^-4 relative rounding per element, averaged
#     over thousands of elements): above LOSS_ULPS, so these bounds tell float8 from float32.
LOSS_ULPS = 1e-6
SGD = ["training.optimizer=sgd"]


@pytest.fixture(scope="module")
def sgd_runs(tmp_path_factory) -> dict:
    """10 SGD steps of the single process, one micro-batch of 4, per recipe (None: float32)."""
    return {recipe: _train(0, 1, _train_argv(str(tmp_path_factory.mktemp(f"sgd-{recipe}")), "training.steps=10",
                                             *SGD, *opts)) for recipe, opts in FLOAT8.items()}


# FSDP 2 against one process with the whole batch in one micro-batch: tensorwise, each
# rank scales the activations and gradients of its 2 sequences, not of all 4, so the
# runs differ by float8 rounding with other scales (measured 4.2e-6 / 7.0e-6, seeds 0 /
# 1: the float8 error's own size, bounded by 10x its largest measurement, 1e-4); rowwise
# per-token forward scales do not depend on the split, only the weight-gradient GEMM's
# per-column scales over M do (measured 1.6e-7 / 1.1e-7: bound 2e-6).
ONE_BATCH_BOUNDS = {"tensorwise": 1e-4, "rowwise": 2e-6}


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_float8_tracks_single_process_float8(sgd_runs, tmp_path, recipe):
    """FSDP 2: each rank quantizes the activations and gradients of its own half of the
    batch (the weights are all-gathered, so their scales are the global ones). So it
    matches a single process that runs the same halves as micro-batches to float32
    rounding (measured: bitwise, 2-rank sums are exact), and the single process with the
    whole batch in one micro-batch only to the float8 error."""
    argv = _train_argv(str(tmp_path / "fsdp"), "training.steps=10", *SGD, "parallel.dp_shard=2",
                       "training.micro_batch_size=2", *FLOAT8[recipe])
    out = run_on_ranks(_train, 2, argv, timeout=120)
    assert out[0] == out[1]  # the logged loss is reduced over the ranks
    halves = _train(0, 1, _train_argv(str(tmp_path / "accum"), "training.steps=10", *SGD,
                                      "training.micro_batch_size=2", *FLOAT8[recipe]))
    rel = lambda a, b: max(abs(x - y) / y for x, y in zip(a, b))  # noqa: E731
    assert rel(out[0], halves) <= LOSS_ULPS, (recipe, out[0], halves)
    assert rel(out[0], sgd_runs[recipe]) <= ONE_BATCH_BOUNDS[recipe], (recipe, out[0], sgd_runs[recipe])
    assert rel(out[0], sgd_runs[None]) > LOSS_ULPS  # float8 is in use on the ranks


# ---------------------------------------------------------------------------------------
# 7. CUDA (only where there is a GPU with float8: compute capability 8.9 or newer)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with float8 support (compute capability >= 8.9)")
@pytest.mark.parametrize("recipe", RECIPES)
def test_cuda_matches_the_emulation(recipe):
    """cuBLASLt's float8 GEMMs (bf16 output, fast accumulation in the forward, their own
    accumulation order) against the CPU emulation from the same bf16 inputs: within 1e-2
    relative (norm). The same check run on CPU gives 1.7e-3 (the bf16 output rounding)."""
    if recipe == "rowwise" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("rowwise _scaled_mm (CUTLASS) is an sm90 kernel; other archs depend on the torch/CUDA build")
    M, K, N = 256, 512, 768  # every GEMM's row count a multiple of 256 (pytorch#133334, rowwise)
    x, w, go = (t.to(torch.bfloat16) for t in _gaussian(M, K, N))
    lin = float8.Float8Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w.cuda())
    lin.recipe = recipe
    xc = x.cuda().requires_grad_()
    out = lin(xc.view(2, M // 2, K))
    out.backward(go.cuda().view(2, M // 2, N))
    torch.cuda.synchronize()
    got = (out.detach().reshape(M, N).float().cpu(), xc.grad.float().cpu(), lin.weight.grad.float().cpu())
    for name, a, b in zip(("out", "grad_x", "grad_w"), got, emulate(x, w, go, recipe)):
        assert torch.isfinite(a).all(), name
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel <= 1e-2, (recipe, name, rel)


# ---------------------------------------------------------------------------------------
# 8. Composition: FSDP float8 all-gather, tensor parallel


def _gathered_bytes(rank: int, world: int, float8_all_gather: bool) -> dict:
    """One forward of the debug-shaped model under FSDP over every rank: the bytes each
    all-gather hands in, and the output (the same weights either way)."""
    import fsdp

    args = llama.model_args("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128)
    model = llama.build_model(args, "meta")
    float8.convert_to_float8(model, "tensorwise", fsdp_float8_all_gather=float8_all_gather)
    fsdp.apply_fsdp(model, list(model.layers.values()), dist.group.WORLD)
    llama.materialize(model, "cpu")
    llama.init_weights(model, args, 0)
    sizes, real = [], dist.all_gather_single

    def counting(out, inp, *a, **k):
        sizes.append(inp.numel() * inp.element_size())
        return real(out, inp, *a, **k)

    dist.all_gather_single = counting
    try:
        tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
        out = model(tokens)
    finally:
        dist.all_gather_single = real
    return dict(sizes=sizes, out=out.detach())


def test_fsdp_float8_all_gather_sends_a_quarter_of_fp32_and_changes_nothing():
    """Weights of float8 linears gathered already in e4m3: 1 byte per element instead of
    4 (float32 here; 2 with bf16), with the scale of the whole weight, so the forward is
    bitwise the one that quantizes the gathered float32 weight."""
    plain = run_on_ranks(_gathered_bytes, 2, False, timeout=60)
    f8 = run_on_ranks(_gathered_bytes, 2, True, timeout=60)
    dim, ffn = 64, 192  # ffn: 2/3 * 4 * 64 rounded up to multiple_of 64
    block_linear = 64 * 64 * 2 + 32 * 64 * 2 + ffn * 64 * 3  # wq, wo, wk, wv, w1, w2, w3
    norms = 2 * dim
    for rank in range(2):
        assert torch.equal(plain[rank]["out"], f8[rank]["out"])
        root = plain[rank]["sizes"][0]
        assert f8[rank]["sizes"][0] == root  # root unit: embeddings, norm, output stay float32
        for p_bytes, f_bytes in zip(plain[rank]["sizes"][1:], f8[rank]["sizes"][1:]):
            assert p_bytes == 4 * (block_linear + norms) // 2
            assert f_bytes == (block_linear + 4 * norms) // 2


def test_fsdp_float8_all_gather_trains_bitwise_the_same(tmp_path):
    argv = _train_argv(str(tmp_path / "a"), "training.steps=5", "parallel.dp_shard=2", "training.micro_batch_size=2",
                       *FLOAT8["tensorwise"])
    plain = run_on_ranks(_train, 2, argv, timeout=120)
    f8 = run_on_ranks(_train, 2, argv[:-1] + [argv[-1], "float8.fsdp_float8_all_gather=true"], timeout=120)
    assert f8[0] == plain[0]


def test_fsdp_float8_all_gather_needs_tensorwise():
    cfg = config.load_config(os.path.join(ROOT, "configs/debug.yaml"),
                            ["float8.enabled=true", "float8.recipe=rowwise", "float8.fsdp_float8_all_gather=true"])
    with pytest.raises(ValueError, match="fsdp_float8_all_gather.*tensorwise"):
        config.validate(cfg, 1)


# TP 2 and 4 against the single-process float8 run. Every tensorwise amax of a sharded
# operand is all-reduced over tp (weights; row-parallel inputs; column-parallel output
# gradients), so the scales are the single process's and only float32 summation order
# differs (SGD: see LOSS_ULPS above). Measured largest relative loss difference over 10
# steps: tp 2 and tp 4 (no SP) 1.1e-7, one float32 ulp of the loss, on Intel and AMD;
# float8 vs float32 over the same steps: 3.5e-6 (4 KV heads) and 6.5e-6 (8).
@pytest.mark.parametrize("tp, kv_heads, extra", [(2, 4, []), (4, 8, ["parallel.sequence_parallel=false"])])
def test_tp_float8_tracks_single_process_float8(tmp_path, tp, kv_heads, extra):
    """(With 4 KV heads of dim 8, wk / wv would hold 8 rows per rank at tp 4, too few
    for _scaled_mm, and stay in float32 there: test_tp_float8_skips_what_tp_makes_too_small.)"""
    common = ["training.steps=10", *SGD, "model.n_heads=8", f"model.n_kv_heads={kv_heads}"]
    single = _train(0, 1, _train_argv(str(tmp_path / "single"), *common, *FLOAT8["tensorwise"]))
    out = run_on_ranks(_train, tp, _train_argv(str(tmp_path / "tp"), *common, f"parallel.tp={tp}", *extra,
                                               *FLOAT8["tensorwise"]), timeout=180)
    fp32 = _train(0, 1, _train_argv(str(tmp_path / "fp32"), *common))
    diff = max(abs(a - b) / b for a, b in zip(out[0], single))
    print(f"tp={tp} float8 vs single-process float8: {diff:.2e}")
    assert diff <= LOSS_ULPS, (out[0], single)
    in_use = max(abs(a - b) / b for a, b in zip(single, fp32))
    print(f"float8 vs float32: {in_use:.2e}")
    assert in_use > LOSS_ULPS  # float8 is in use, and the bound tells it from float32


def test_tp_float8_skips_what_tp_makes_too_small():
    """The float8 swap runs before tensor parallel but checks each weight's shape as TP
    will leave it, and names the layers it keeps in high precision."""
    import functools

    import tensor_parallel

    args = llama.model_args("debug", dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=128)
    model = llama.build_model(args, "meta")
    skipped = dict(float8.convert_to_float8(model, "tensorwise",
                                            local_shape=functools.partial(tensor_parallel.local_shape, t=4)))
    assert set(skipped) == {"layers.0.attention.wk", "layers.0.attention.wv", "output"}
    assert "weight (8, 64) per tensor-parallel rank" in skipped["layers.0.attention.wk"]
    assert _linears(model)["layers.0.attention.wo"] is float8.Float8Linear  # (64, 16) per rank: fine


# ---------------------------------------------------------------------------------------
# 9. Async TP with float8: the rings of tensor_parallel.py run float8.Float8RingMatmuls
#
# The sync float8 path all-gathers the high-precision activations and runs Float8Matmul on
# the whole tensor; the rings quantize each shard once (scales made equal over tp) and run
# the same GEMMs block by block. Every block's rows are the sync GEMM's rows, on the same
# float8 operands; what differs is the order of float32 sums: dW over the t blocks of
# tokens, dX over the group's weights and the ranks. Both orders compute an inner product
# of n exact float8 operands, each within gamma_n |A|^T |B| of its exact value (Higham,
# any order and blocking; gamma_n = n u / (1 - n u), u = 2^-24), so
#     |async - sync| <= 2 gamma_n (|A| |B|)  elementwise,
# with A, B the dequantized float8 operands (the oracle's fake_quant, with the sync path's
# scales) and n the contraction length. Measured: forward outputs and the row-parallel dX
# bitwise equal, dW and the column group's dX at 1e-3 to 1e-1 of this bound. A scale that
# is not the sync path's (e.g. not synced over tp) moves results by float8 rounding, 2^-4
# relative: hundreds of times the bound.

U32 = 2.0**-24
TP_B, TP_S, TP_D = 2, 32, 64  # tokens per ring block on 2 ranks: 2 x 16 = 32, divisible by 16


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _f8_linear(weight: torch.Tensor, recipe: str | None, group) -> nn.Linear:
    """A TP shard as a Float8Linear (recipe) or a plain nn.Linear (None), as apply_tp leaves them."""
    lin = float8.Float8Linear(weight.shape[1], weight.shape[0], bias=False) if recipe else \
        nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = nn.Parameter(weight.clone())
    if recipe:
        lin.recipe, lin.amax_group = recipe, group
    return lin


def _seeded(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _column_tensors(kinds: tuple):
    """x (B, S, D) whose sequence halves differ 8x in range (so each rank's shard has its own
    amax) with one outlier token; per linear W (N, D) and dY (B, S, N)."""
    x = _seeded(1, TP_B, TP_S, TP_D)
    x[:, : TP_S // 2] *= 8.0
    x[1, 5] *= 30.0
    ws = [_seeded(10 + i, n, TP_D, scale=TP_D**-0.5) for i, n in enumerate((64, 32, 32)[:len(kinds)])]
    dys = [_seeded(20 + i, TP_B, TP_S, w.shape[0]) for i, w in enumerate(ws)]
    for dy in dys:
        dy[0, -3] *= 50.0  # a token with a large gradient (in the second rank's sequence shard)
    return x, ws, dys


def _deq(t: torch.Tensor, recipe: str | None, grad: bool = False, dim: int | None = None) -> torch.Tensor:
    """The sync path's dequantized float8 operand (the oracle): tensorwise one scale (e5m2
    for gradients), rowwise a power-of-two scale per slice along `dim`; plain: t itself."""
    if recipe is None:
        return t
    if recipe == "tensorwise":
        return fake_quant(t, E5M2 if grad else E4M3)
    return fake_quant(t, E4M3, dim=dim, pow2=True)


def _async_vs_sync_ops(rank: int, world: int, recipe: str) -> dict:
    """A column-parallel group (two float8 linears and a plain one, as wq / wk in float8 and
    a wv too small for it: two rings) and a row-parallel float8 linear, sync vs async,
    forward and backward; returns per tensor the largest |async - sync| / bound."""
    import tensor_parallel as tp

    group, r, t = dist.group.WORLD, rank, world
    # 2 gamma_n |A||B| for float32 sums in another order; rowwise GEMMs write bf16 (CUDA's rule,
    # float8.SCALED_MM_OUT) block by block in async and once in sync: 2 u_bf16 |A||B| more.
    bound = lambda n: 2 * _gamma(n) + (2 * 2.0 ** -8 if recipe == "rowwise" else 0.0)  # noqa: E731
    kinds = (recipe, recipe, None)
    x, ws, dys = _column_tensors(kinds)
    got = {}
    for async_tp in (False, True):
        lins = tuple(_f8_linear(w.chunk(t, 0)[r], k, group) for w, k in zip(ws, kinds))
        xs = x.chunk(t, 1)[r].clone().requires_grad_()
        ys = tp.column_parallel(xs, lins, group=group, sequence_parallel=True, async_tp=async_tp)
        torch.autograd.backward(ys, [dy.chunk(t, -1)[r] for dy in dys])
        got[async_tp] = {**{f"y{i}": y.detach() for i, y in enumerate(ys)}, "dx": xs.grad,
                         **{f"dw{i}": lin.weight.grad for i, lin in enumerate(lins)}}
    M = TP_B * TP_S
    x2, bounds = x.reshape(M, TP_D), {}
    for i, (w, dy, k) in enumerate(zip(ws, dys, kinds)):
        g2, wl = dy.reshape(M, -1), w.chunk(t, 0)[r]
        gl = g2.chunk(t, 1)[r]  # this rank's output columns
        # forward: x rows over D, W rows over D (tensorwise: scales of the whole tensors)
        xq = _deq(x2, k, dim=1)
        wq = _deq(w, k, dim=1).chunk(t, 0)[r] if k == "tensorwise" else _deq(wl, k, dim=1)
        bounds[f"y{i}"] = bound(TP_D) * (xq.abs() @ wq.abs().t())  # (M, N_i / t)
        # dW_i = dY_i^T x over all M tokens: dY per column over M (local), x per feature over M
        gq = _deq(g2, k, grad=True).chunk(t, 1)[r] if k == "tensorwise" else _deq(gl, k, True, dim=0)
        bounds[f"dw{i}"] = bound(M) * (gq.abs().t() @ _deq(x2, k, dim=0).abs())
    # dX = sum over ranks q and linears i of dY_i^(q) W_i^(q): N_total products per element
    n_total = sum(w.shape[0] for w in ws)
    terms = 0
    for q in range(t):
        for w, dy, k in zip(ws, dys, kinds):
            gq = dy.reshape(M, -1).chunk(t, 1)[q]
            if k == "tensorwise":
                gq, wq = _deq(dy.reshape(M, -1), k, grad=True).chunk(t, 1)[q], _deq(w, k).chunk(t, 0)[q]
            else:  # rowwise: dY per token over the rank's columns, W per column over its rows
                gq, wq = _deq(gq, k, True, dim=1), _deq(w.chunk(t, 0)[q], k, dim=0)
            terms = terms + gq.abs() @ wq.abs()
    bounds["dx"] = bound(n_total) * terms.view(TP_B, TP_S, TP_D).chunk(t, 1)[r]

    # Row-parallel: x (B, S, K) split over features, W (D, K) over its columns.
    K = 64
    xr, wr, dyr = _seeded(3, TP_B, TP_S, K), _seeded(4, TP_D, K, scale=K**-0.5), _seeded(5, TP_B, TP_S, TP_D)
    xr[..., : K // 2] *= 8.0  # rank 0's features larger: the tensorwise scale needs the amax over tp
    dyr[:, TP_S // 2 + 2] *= 40.0
    for async_tp in (False, True):
        lin = _f8_linear(wr.chunk(t, 1)[r], recipe, group)
        xs = xr.chunk(t, -1)[r].clone().requires_grad_()
        y = tp.row_parallel(xs, lin, group=group, sequence_parallel=True, async_tp=async_tp)
        y.backward(dyr.chunk(t, 1)[r])
        got[async_tp].update({"row.y": y.detach(), "row.dx": xs.grad, "row.dw": lin.weight.grad})
    x2, g2 = xr.reshape(M, K), dyr.reshape(M, TP_D)
    if recipe == "tensorwise":  # one scale over the whole x, W (all ranks' features) and dY
        xq, wq = _deq(x2, recipe).chunk(t, 1), _deq(wr, recipe).chunk(t, 1)
        gq = gt = _deq(g2, recipe, True)
    else:  # x and W per row over this rank's features (forward); dY per token, W per column
        xq = [_deq(a, recipe, dim=1) for a in x2.chunk(t, 1)]  # over D; x and dY per feature over M
        wq = [_deq(a, recipe, dim=1) for a in wr.chunk(t, 1)]
        gq, gt = _deq(g2, recipe, True, dim=1), _deq(g2, recipe, True, dim=0)
    wg = _deq(wr.chunk(t, 1)[r], recipe, dim=0) if recipe == "rowwise" else wq[r]
    xg = _deq(x2.chunk(t, 1)[r], recipe, dim=0) if recipe == "rowwise" else xq[r]
    # y = the sum over both ranks' features (partial GEMMs, then one reduction): K products
    bounds["row.y"] = bound(K) * sum(a.abs() @ b.abs().t() for a, b in zip(xq, wq)).view(
        TP_B, TP_S, TP_D).chunk(t, 1)[r]
    bounds["row.dx"] = bound(TP_D) * (gq.abs() @ wg.abs())
    bounds["row.dw"] = bound(M) * (gt.abs().t() @ xg.abs())
    out = {}
    for name, sync in got[False].items():
        diff = (got[True][name] - sync).abs()
        bound = bounds[name].reshape(diff.shape)
        out[name] = dict(ratio=(diff / bound.clamp_min(1e-30)).max().item(), bitwise=torch.equal(got[True][name], sync),
                         rel=(diff.max() / sync.abs().max()).item())
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_async_tp_float8_ops_equal_sync_within_float32_rounding(recipe):
    """2 ranks, float32: every output and gradient of the async rings (column group of two
    float8 linears and a plain one, row-parallel float8 linear) within 2 gamma_n |A||B| of
    the sync float8 path (derivation above)."""
    out = run_on_ranks(_async_vs_sync_ops, 2, recipe, timeout=120)
    for rank, res in enumerate(out):
        for name, r in res.items():
            print(f"{recipe} rank {rank} {name}: {r['ratio']:.2e} of the bound, rel {r['rel']:.1e}"
                  f"{' (bitwise)' if r['bitwise'] else ''}")
            assert r["ratio"] <= 1.0, (recipe, rank, name, r)
    # float8 is in use and the rings run it: not the plain ring's result on the same data.
    assert not all(r["bitwise"] for res in out for r in res.values())


def _ring_bytes(rank: int, world: int, kind: str | None, autocast: bool) -> dict:
    """Bytes each ring sends (comm.CommCounter: what isend hands in), forward and backward
    apart: a column group of two linears (its forward ring gathers x; backward moves dX
    partial sums) and a row linear (forward moves partial sums; backward gathers dY)."""
    import comm
    import tensor_parallel as tp

    group, r, t = dist.group.WORLD, rank, world
    x, ws, dys = _column_tensors(("tensorwise", "tensorwise"))
    lins = tuple(_f8_linear(w.chunk(t, 0)[r], kind, group) for w in ws)
    row = _f8_linear(_seeded(4, TP_D, 64).chunk(t, 1)[r], kind, group)
    xs = x.chunk(t, 1)[r].clone().requires_grad_()
    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with comm.CommCounter() as seen:
            ys = tp.column_parallel(xs, lins, group=group, sequence_parallel=True, async_tp=True)
            y = tp.row_parallel(torch.cat(ys, -1)[..., :64 // t], row, group=group, sequence_parallel=True,
                                async_tp=True)
        out["forward"] = dict(seen.bytes)
        with comm.CommCounter() as seen:
            torch.autograd.backward([*ys, y], [*(dy.chunk(t, -1)[r] for dy in dys), torch.ones_like(y)])
        out["backward"] = dict(seen.bytes)
    return out


def _all_ring_bytes(rank: int, world: int) -> dict:
    """_ring_bytes' sends for plain, tensorwise and rowwise linears, float32 and bf16 autocast."""
    return {(kind, autocast): {k: v[("world", "send")] for k, v in _ring_bytes(rank, world, kind, autocast).items()}
            for kind in (None, "tensorwise", "rowwise") for autocast in (False, True)}


def test_async_tp_float8_rings_move_float8():
    """The all-gather rings carry float8: tensorwise 1 byte per element, a quarter of the
    float32 ring's and half of the bf16 ring's; rowwise 2 bytes per element (rows scaled
    per token and per feature) plus a float32 scale per token. The rings of partial sums
    stay in the compute dtype, as the sync path's reduce-scatters."""
    block = TP_B * TP_S // 2 * TP_D  # elements of one sequence block of x or dY; t - 1 = 1 send per ring
    sends = run_on_ranks(_all_ring_bytes, 2, timeout=120)[0]
    for (kind, autocast), sent in sends.items():
        print(kind, "bf16" if autocast else "fp32", sent)
    for autocast, a in ((False, 4), (True, 2)):
        # forward: the column ring (x) + the row ring (partial sums); backward: the column
        # ring (dX partial sums) + the row ring (dY)
        assert sends[None, autocast] == {"forward": 2 * block * a, "backward": 2 * block * a}
        assert sends["tensorwise", autocast] == {"forward": block + block * a, "backward": block * a + block}
        rowwise = block * 2 + TP_B * TP_S // 2 * 4
        assert sends["rowwise", autocast] == {"forward": rowwise + block * a, "backward": block * a + rowwise}
    gathered = lambda kind, autocast: sends[kind, autocast]["forward"] - block * (2 if autocast else 4)  # noqa: E731
    assert gathered("tensorwise", False) * 4 == gathered(None, False)  # a quarter of float32's
    assert gathered("tensorwise", True) * 2 == gathered(None, True)  # half of bf16's


def _ring_scales(rank: int, world: int, synced: bool) -> list:
    """The tensorwise scales of every float8 GEMM the async rings run (spying on
    torch._scaled_mm), from inputs and gradients whose shards differ 8x in range; with
    synced=False the linears get no amax group: each rank scales its own shard."""
    import tensor_parallel as tp

    group, r, t = dist.group.WORLD, rank, world
    x, ws, dys = _column_tensors(("tensorwise", "tensorwise"))
    lins = tuple(_f8_linear(w.chunk(t, 0)[r], "tensorwise", group if synced else None) for w in ws)
    scales, real = [], torch._scaled_mm

    def spy(a, b, scale_a, scale_b, *args, **kwargs):
        scales.append((scale_a.item(), scale_b.item()))
        return real(a, b, scale_a, scale_b, *args, **kwargs)

    torch._scaled_mm = spy
    try:
        xs = x.chunk(t, 1)[r].clone().requires_grad_()
        ys = tp.column_parallel(xs, lins, group=group, sequence_parallel=True, async_tp=True)
        torch.autograd.backward(ys, [dy.chunk(t, -1)[r] for dy in dys])
    finally:
        torch._scaled_mm = real
    return scales


def test_async_tp_float8_tensorwise_scales_are_synced_over_tp():
    """Every float8 GEMM of the rings uses the same scales on both ranks, those of the whole
    logical tensor (x, each W, each dY): x's inverse scale is amax(x) / 448 computed over the
    WHOLE sequence. Without the amax group each rank would use its own shard's scale: the
    same comparison then fails (it can)."""
    synced = run_on_ranks(_ring_scales, 2, True, timeout=60)
    assert synced[0] == synced[1] and len(synced[0]) == 2 * 2 + 2 * 2 * 2  # forward 2 x 2 blocks; backward 2 x (dX, dW) x 2
    x, _, _ = _column_tensors(("tensorwise",))
    assert synced[0][0][0] == (448.0 / x.abs().max().double()).float().reciprocal().item()
    alone = run_on_ranks(_ring_scales, 2, False, timeout=60)
    assert alone[0] != alone[1]


# Training through train.main, 10 SGD steps, float32 (bounds: LOSS_ULPS above; async and
# sync differ only by float32 summation order, see the derivation at the top of this
# section). Measured on tp 2: async == sync bitwise for both recipes; both 1.1e-7 (one
# ulp of the loss) from the single process; float8 vs float32 7.6e-6 / 1.1e-5.
@pytest.mark.parametrize("recipe", RECIPES)
def test_async_tp_float8_tracks_sync_tp_float8_and_single_process(sgd_runs, tmp_path, recipe):
    common = ["training.steps=10", *SGD, "parallel.tp=2", *FLOAT8[recipe]]
    sync = run_on_ranks(_train, 2, _train_argv(str(tmp_path / "sync"), *common), timeout=180)
    out = run_on_ranks(_train, 2, _train_argv(str(tmp_path / "async"), *common, "parallel.async_tp=true"),
                       timeout=180)
    assert out[0] == out[1]
    rel = lambda a, b: max(abs(x - y) / y for x, y in zip(a, b))  # noqa: E731
    print(f"{recipe}: async vs sync {rel(out[0], sync[0]):.1e}, vs single {rel(out[0], sgd_runs[recipe]):.1e}, "
          f"float8 vs float32 {rel(sgd_runs[recipe], sgd_runs[None]):.1e}")
    assert rel(out[0], sync[0]) <= LOSS_ULPS, (out[0], sync[0])
    assert rel(out[0], sgd_runs[recipe]) <= LOSS_ULPS, (out[0], sgd_runs[recipe])
    assert rel(sgd_runs[recipe], sgd_runs[None]) > LOSS_ULPS  # float8 is in use, the bound tells


def test_fsdp2_async_tp2_float8_all_gather_tracks_single_process(sgd_runs, tmp_path):
    """FSDP 2 x async TP 2, tensorwise, weights all-gathered in float8 by FSDP (their scale
    then comes with them) and activations through the float8 rings: each FSDP rank scales
    its own 2 sequences, so it matches one process running the same halves as micro-batches
    (LOSS_ULPS: float32 summation order only)."""
    common = ["training.steps=10", *SGD, *FLOAT8["tensorwise"], "training.micro_batch_size=2"]
    halves = _train(0, 1, _train_argv(str(tmp_path / "halves"), *common))
    out = run_on_ranks(_train, 4, _train_argv(str(tmp_path / "fsdp-tp"), *common, "parallel.dp_shard=2",
                                              "parallel.tp=2", "parallel.async_tp=true",
                                              "float8.fsdp_float8_all_gather=true"), timeout=300)
    assert all(o == out[0] for o in out)
    fp32 = sgd_runs[None]
    rel = lambda a, b: max(abs(x - y) / y for x, y in zip(a, b))  # noqa: E731
    print(f"fsdp 2 x async tp 2 float8 vs single-process halves {rel(out[0], halves):.1e}, "
          f"float8 vs float32 {rel(halves, fp32):.1e}")
    assert rel(out[0], halves) <= LOSS_ULPS, (out[0], halves)
    assert rel(halves, fp32) > LOSS_ULPS
