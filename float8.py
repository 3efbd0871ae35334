"""Float8 linear layers through torch._scaled_mm, with dynamic tensorwise or rowwise scales.

What it does
    `convert_to_float8(model, recipe)` swaps eligible nn.Linear modules for
    `Float8Linear` (same parameter objects and names). Its forward is the autograd
    Function `Float8Matmul`: the three GEMMs of a linear layer,
        out    = x @ W^T        (M, K) x (K, N)
        grad_x = go @ W         (M, N) x (N, K)
        grad_W = go^T @ x       (N, M) x (M, K)
    each run by torch._scaled_mm on float8 operands with float32 dequantization scales,
    the result in the compute dtype. Master weights, optimizer and everything outside
    these matmuls stay in high precision. Any model: only `type(m) is nn.Linear` modules
    are swapped (those without bias, dims divisible by 16, not named in `skip`); the
    others are returned with the reason. `check_float8_args(recipe,
    fsdp_float8_all_gather)` is the settings check, called by the swap and config.validate.
    `Float8RingMatmuls`: the same GEMMs block by block, for async TP's rings.

Formats and scales
    e4m3 (max 448, 3 mantissa bits) carries activations and weights: more precision.
    tensorwise: gradients go as e5m2 (max 57344, 2 mantissa bits): more range, since
    gradient magnitudes vary more; one scale per tensor, scale = 448 / amax (57344 for
    e5m2), computed in float64 then stored in float32, so x ~ x_f8 / scale. All
    operands are quantized once; forward saves x and W already in float8.
    rowwise: one scale per row along each GEMM's contraction dim, rounded down to a
    power of two (exact in binary); gradients in e4m3 (torchao's rowwise recipe). A
    tensor enters two GEMMs along different axes, so backward re-quantizes x and W
    along the other axis from high precision (more accurate, more casts).
    Casts saturate: values are clamped to +-max before .to(float8) (e5m2 would give inf).
    amax is clamped to 1e-12 so an all-zero tensor does not divide by zero.

torch._scaled_mm's rules (CUDA, enforced here on every device so CPU-green code runs
on a GPU): the first operand row-major, the second column-major (we pass B.t() of a
row-major (N, K)); K and N (and M for the weight-gradient GEMM) divisible by 16; scales
are dequantization multipliers 1/scale: float32 scalars (tensorwise) or (M, 1) and
(1, N) (rowwise); e5m2 x e5m2 is not allowed (go is paired with e4m3 operands); the
output dtype: float32, bf16 or fp16 tensorwise, bf16 or fp16 rowwise (SCALED_MM_OUT), so
a float32 model's rowwise GEMMs run in bf16 and are cast to float32 (mm_out_dtype;
train.py says so once). check_scaled_mm enforces all of it before every call.
On CPU _scaled_mm runs (slowly) and equals dequantize-then-matmul bit for bit.

Composition
    Tensor parallel: a TP-sharded weight, a sequence-sharded input or a vocabulary-
    sharded gradient each hold part of the logical tensor. Pass `amax_group` (the tp
    group) and the tensorwise amaxes are all-reduced (MAX) over it, so every rank uses
    the scale of the whole logical tensor and the result does not depend on the TP
    degree. (Rowwise scales are per row of the contraction dim, over this rank's slice
    of it; Float8Matmul does not use the amax group there.)
    Async TP: `Float8RingMatmuls` (a Float8Linear's `ring_matmuls`) runs the three GEMMs
    block by block for tensor_parallel.py's rings, with Float8Matmul's operands and
    scales: each shard is quantized ONCE before its ring, so the ring all-gathers float8.
    Tensorwise: x (e4m3) or dY (e5m2), 1 byte per element, the scale from the amax over
    tp (the same on every rank: none travels). Rowwise: per token its row scaled over
    the features with its float32 scale (scales travel with their rows), and its row
    scaled per feature over ALL tokens, the operand of the weight-gradient GEMM (which
    the sync path quantizes from the gathered high-precision tensor): per-feature amaxes
    of a sequence shard all-reduced (MAX) over tp, so 2 bytes per element + 4 per token.
    (Re-gathering x in backward for the weight gradient, Megatron's way, would keep
    less memory, for a second ring.) Weights are quantized once per forward (rowwise
    both ways); a weight FSDP gathered in float8 is used as it came. Blocks are the
    sync GEMMs' rows; only float32 sums run in another order (dW over blocks of tokens).
    FSDP: the forward sees the all-gathered full weight, so its amax is global already.
    With `fsdp_float8_all_gather` (tensorwise only) the weight is cast to e4m3 BEFORE
    the all-gather, through fsdp.py's payload hooks (`fsdp_pre_all_gather` /
    `fsdp_post_all_gather` methods below): the shard's amax is all-reduced (MAX) over
    the FSDP group (and the TP group), so every rank casts with the scale of the whole
    weight, the gather carries 1 byte per element (half of bf16, a quarter of fp32), and
    the forward GEMM uses the gathered float8 weight and scale directly. The scale is
    the one the forward would compute from the gathered weight, so the result is the
    same bit for bit. Rowwise weights are gathered in high precision (their per-row
    scales along K would need the whole row anyway, and backward re-quantizes W).

Communication: with amax_group, three all-reduces of one float per linear per step
(x and W in forward, go in backward); with the float8 all-gather, one all-reduce of one
float per weight per gather. In async TP's rings: tensorwise x once per column group
(not per linear), W, dY as above; rowwise one all-reduce of D floats per sequence-
sharded operand (x of a column group, dY of a row linear). Memory: forward saves x and
W in float8 (tensorwise: 1 byte per element instead of 2 or 4; the async rings keep the
gathered float8 x of a column group: 1 byte, rowwise 2 + 4 per token).

What TorchTitan / torchao do that this file does not
    Float8 all-gathers in SYNC tensor parallel (there the sequence all-gather before a
    column-parallel float8 linear carries high precision; async TP's rings do move
    float8, for both recipes, where torchao's float8 TP is tensorwise only); a single
    all-reduce of every weight's amax after the optimizer step (we do one per weight per
    gather); torch.compile fusion of the casts (we run them eagerly: on a GPU, compile is
    what makes float8 fast); delayed scaling (removed from torchao); the
    rowwise_with_gw_hp recipe; `pad_inner_dim` (we skip layers whose dims do not divide
    by 16, and say so).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")
EPS = 1e-12


def _amax(x: torch.Tensor, dim: int | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    """max |x| over the whole tensor (dim None) or along `dim` (keepdim), float32; with a
    group, over every rank's x (the shards of one logical tensor)."""
    amax = x.detach().abs().amax() if dim is None else x.detach().abs().amax(dim=dim, keepdim=True)
    amax = amax.float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)  # comm: tp group, one float (per slice)
    return amax


def to_float8(x: torch.Tensor, dtype: torch.dtype, dim: int | None = None, pow2: bool = False,
              group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize: (x_f8, inverse scale) with x ~ x_f8 * inverse_scale. dim=None: one
    scale for the tensor; dim=d: one scale per slice along d (reduced over d)."""
    fmax = torch.finfo(dtype).max
    scale = (fmax / torch.clamp(_amax(x, dim, group).double(), min=EPS)).float()
    if pow2:  # round down to a power of two: multiplying by it is exact
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    x_f8 = torch.clamp(x.float() * scale, -fmax, fmax).to(dtype)
    return x_f8, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major, as _scaled_mm wants its second operand."""
    return t.t().contiguous().t()


# The output dtypes torch._scaled_mm accepts on every CUDA GPU with float8 (sm89 and up), per
# scaling (aten/src/ATen/native/cuda/ScaledBlas.cpp): rowwise runs CUTLASS's f8f8bf16 kernel,
# which writes bf16 (fp16 too in recent torch); cuBLAS's rowwise float32 output exists only on
# sm90 with cuBLAS >= 12.9, so it is not relied on. float64 output exists nowhere on CUDA.
SCALED_MM_OUT = {"tensorwise": (torch.float32, torch.bfloat16, torch.float16),
                 "rowwise": (torch.bfloat16, torch.float16)}


def mm_out_dtype(scaling: str, dtype: torch.dtype) -> torch.dtype:
    """What _scaled_mm is asked for when the caller wants `dtype`: dtype itself where the
    rules allow it, else float32 (tensorwise, for float64), else bf16 (rowwise, for float32
    or float64); the result is then cast to dtype."""
    allowed = SCALED_MM_OUT[scaling]
    return dtype if dtype in allowed else torch.float32 if torch.float32 in allowed else torch.bfloat16


def check_scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
                    out_dtype: torch.dtype) -> str:
    """CUDA's rules for torch._scaled_mm, enforced on every device so that CPU-green code
    runs on a GPU (CPU's _scaled_mm would accept all of these). Returns the scaling."""
    (M, K), N = a.shape, b.shape[1]
    where = f"float8 matmul ({M}, {K}) x ({K}, {N})"
    if K % 16 or N % 16:
        raise ValueError(f"{where}: K and N must be divisible by 16")
    if a.stride(1) != 1 or b.stride(0) != 1:
        raise ValueError(f"{where}: the first operand must be row-major and the second column-major "
                         f"(strides {a.stride()}, {b.stride()})")
    if a.dtype == b.dtype == E5M2:
        raise ValueError(f"{where}: e5m2 x e5m2 is not supported; one operand must be e4m3")
    if a_inv.numel() == b_inv.numel() == 1:
        scaling = "tensorwise"
    elif tuple(a_inv.shape) == (M, 1) and tuple(b_inv.shape) == (1, N) and a_inv.is_contiguous() \
            and b_inv.is_contiguous():
        scaling = "rowwise"
    else:
        raise ValueError(f"{where}: scales {tuple(a_inv.shape)} and {tuple(b_inv.shape)} are neither tensorwise "
                         f"(one each) nor rowwise (({M}, 1) and (1, {N}), contiguous)")
    if out_dtype not in SCALED_MM_OUT[scaling]:
        raise ValueError(f"{where}: CUDA's _scaled_mm rejects {out_dtype} output with {scaling} scaling "
                         f"(it allows {[str(d) for d in SCALED_MM_OUT[scaling]]}); ask mm_out_dtype")
    return scaling


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv) in out_dtype, with a (M, K) row-major and b (K, N)
    column-major. _scaled_mm computes in the nearest dtype its rules allow (mm_out_dtype:
    rowwise float32 runs in bf16), then the result is cast. fast_accum: CUDA's lower-
    precision accumulation, used (as torchao does) for the forward GEMM only; gradients
    accumulate in full precision. No effect on CPU."""
    a = a.contiguous()
    scaling = "tensorwise" if a_inv.numel() == b_inv.numel() == 1 else "rowwise"
    kernel_dtype = mm_out_dtype(scaling, out_dtype)
    check_scaled_mm(a, a_inv, b, b_inv, kernel_dtype)
    out = torch._scaled_mm(a, b, a_inv, b_inv, out_dtype=kernel_dtype, use_fast_accum=fast_accum)
    return out if kernel_dtype == out_dtype else out.to(out_dtype)


class Float8Matmul(torch.autograd.Function):
    """x (M, K) @ w (N, K)^T -> (M, N), all three GEMMs in float8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, recipe: str, group,
                w_float8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """w_float8: (w_f8, w_inv) already quantized (the FSDP float8 all-gather)."""
        ctx.recipe, ctx.group, ctx.out_dtype = recipe, group, x.dtype
        if recipe == "tensorwise":
            x_f8, x_inv = to_float8(x, E4M3, group=group)
            w_f8, w_inv = w_float8 if w_float8 is not None else to_float8(w, E4M3, group=group)
            ctx.save_for_backward(x_f8, x_inv, w_f8, w_inv)
            return scaled_mm(x_f8, x_inv, w_f8.t(), w_inv, x.dtype, fast_accum=True)
        x_f8, x_inv = to_float8(x, E4M3, dim=1, pow2=True)  # (M, 1): per row over K
        w_f8, w_inv = to_float8(w, E4M3, dim=1, pow2=True)  # (N, 1): per row over K
        ctx.save_for_backward(x, w)
        return scaled_mm(x_f8, x_inv, w_f8.t(), w_inv.view(1, -1), x.dtype, fast_accum=True)  # scale_b (1, N)

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        # Each gradient only if ctx.needs_input_grad asks for it: a zero-bubble pipeline asks
        # for grad_x in its I pass and for grad_w in its W pass (pipeline.py).
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        if ctx.recipe == "tensorwise":
            x_f8, x_inv, w_f8, w_inv = ctx.saved_tensors
            go_f8, go_inv = to_float8(go, E5M2, group=ctx.group)  # (M, N), range over precision
            if want_x:
                grad_x = scaled_mm(go_f8, go_inv, _col_major(w_f8), w_inv, ctx.out_dtype)  # (M, K)
            if want_w:
                grad_w = scaled_mm(go_f8.t(), go_inv, _col_major(x_f8), x_inv, ctx.out_dtype)  # (N, K)
            return grad_x, grad_w, None, None, None
        x, w = ctx.saved_tensors
        if want_x:  # grad_x = go @ w: contraction over N -> go per row (M, 1), w per column (1, K).
            go_f8, go_inv = to_float8(go, E4M3, dim=1, pow2=True)
            w_f8, w_inv = to_float8(w, E4M3, dim=0, pow2=True)
            grad_x = scaled_mm(go_f8, go_inv, _col_major(w_f8), w_inv, ctx.out_dtype)
        if want_w:  # grad_w = go^T @ x: contraction over M -> go per column (N, 1), x per column (1, K).
            goT_f8, goT_inv = to_float8(go, E4M3, dim=0, pow2=True)
            x_f8, x_inv = to_float8(x, E4M3, dim=0, pow2=True)
            grad_w = scaled_mm(goT_f8.t(), goT_inv.view(-1, 1), _col_major(x_f8), x_inv, ctx.out_dtype).to(w.dtype)
        return grad_x, grad_w, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class Float8RingMatmuls:
    """A Float8Linear's three GEMMs on blocks of tokens, for async TP's rings
    (tensor_parallel.Matmuls has the protocol): every operand quantized ONCE, with the
    scales Float8Matmul would use on the whole tensor, so that the rings compute its
    numbers block by block. Tensors are (B, n, features); `packed` is a uint8 (B, n, c):
        tensorwise  c = K: the e4m3 (inputs) or e5m2 (gradients) bytes; the scale, from the
                    amax all-reduced (MAX) over tp, is `shared` (the same on every rank)
        rowwise     c = 2 K + 4: per token its e4m3 row scaled over the features (the GEMM
                    that contracts features), the row's float32 inverse scale (4 bytes: it
                    travels with its row), then its e4m3 row scaled per feature over ALL
                    tokens (the weight-gradient GEMM contracts tokens; for a sequence
                    shard the per-feature amax is all-reduced (MAX) over tp); the per-
                    feature inverse scales (1, K) are `shared`."""

    def __init__(self, recipe: str, dtype: torch.dtype, group: dist.ProcessGroup | None):
        self.recipe, self.dtype, self.group = recipe, dtype, group
        self.key = ("float8", recipe)

    def weight(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tensorwise (w_f8, inv), as FSDP's float8 all-gather left it if it did; rowwise
        (w_f8 per row over K, (N, 1) inv, w_f8 per column over N, (1, K) inv)."""
        if self.recipe == "tensorwise":
            w_float8 = getattr(w, "float8", None)  # gathered in float8 by FSDP
            return w_float8 if w_float8 is not None else to_float8(w.to(self.dtype), E4M3, group=self.group)
        w = w.to(self.dtype)
        return (*to_float8(w, E4M3, dim=1, pow2=True), *to_float8(w, E4M3, dim=0, pow2=True))

    def pack(self, x: torch.Tensor, grad: bool, seq_sharded: bool) -> tuple[torch.Tensor, tuple]:
        B, n, K = x.shape
        x2 = x.to(self.dtype).reshape(-1, K)  # (M, K), M = B n tokens
        if self.recipe == "tensorwise":
            x_f8, inv = to_float8(x2, E5M2 if grad else E4M3, group=self.group)
            return x_f8.view(torch.uint8).view(B, n, K), (inv,)
        row, row_inv = to_float8(x2, E4M3, dim=1, pow2=True)  # (M, 1): over this rank's features
        col, col_inv = to_float8(x2, E4M3, dim=0, pow2=True, group=self.group if seq_sharded else None)  # (1, K)
        packed = torch.cat([row.view(torch.uint8), row_inv.view(torch.uint8), col.view(torch.uint8)], dim=1)
        return packed.view(B, n, 2 * K + 4), (col_inv,)

    def _rows(self, p: torch.Tensor, shared: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) float8 scaled for contracting features, and its inverse scale."""
        flat = p.reshape(-1, p.shape[-1])
        if self.recipe == "tensorwise":
            return flat.view(dtype), shared[0]
        K = (flat.shape[1] - 4) // 2
        return flat[:, :K].view(E4M3), flat[:, K:K + 4].contiguous().view(torch.float32)  # inv (M, 1)

    def _cols(self, p: torch.Tensor, shared: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) float8 scaled for contracting tokens, and its inverse scale (1, K)."""
        flat = p.reshape(-1, p.shape[-1])
        if self.recipe == "tensorwise":
            return flat.view(dtype), shared[0]
        return flat[:, (flat.shape[1] - 4) // 2 + 4:].view(E4M3), shared[0]

    def out(self, xp: torch.Tensor, xs: tuple, w: tuple) -> torch.Tensor:
        B, n, _ = xp.shape
        if (B * n) % 16:
            raise ValueError(f"async TP with float8: {B} x {n} = {B * n} tokens per ring block (micro-batch x "
                             f"seq_len / tp) must be divisible by 16 for the weight-gradient GEMM")
        x_f8, x_inv = self._rows(xp, xs, E4M3)
        w_inv = w[1] if self.recipe == "tensorwise" else w[1].view(1, -1)  # scale_b (1, N)
        return scaled_mm(x_f8, x_inv, w[0].t(), w_inv, self.dtype, fast_accum=True).view(B, n, -1)

    def grad_x(self, gp: torch.Tensor, gs: tuple, w: tuple) -> torch.Tensor:
        B, n, _ = gp.shape
        g_f8, g_inv = self._rows(gp, gs, E5M2 if self.recipe == "tensorwise" else E4M3)
        w_f8, w_inv = w[:2] if self.recipe == "tensorwise" else w[2:]  # rowwise: per column over N
        return scaled_mm(g_f8, g_inv, _col_major(w_f8), w_inv, self.dtype).view(B, n, -1)

    def grad_w(self, gp: torch.Tensor, gs: tuple, xp: torch.Tensor, xs: tuple) -> torch.Tensor:
        g_f8, g_inv = self._cols(gp, gs, E5M2 if self.recipe == "tensorwise" else E4M3)  # (M, N)
        x_f8, x_inv = self._cols(xp, xs, E4M3)  # (M, K)
        g_inv = g_inv if self.recipe == "tensorwise" else g_inv.view(-1, 1)  # scale_a (N, 1)
        # In the compute dtype, as Float8Matmul's (CUDA's rowwise kernels want bf16 out), then
        # accumulated over the blocks in float32.
        return scaled_mm(g_f8.t(), g_inv, _col_major(x_f8), x_inv, self.dtype).to(_acc_dtype(self.dtype))


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmul runs in float8. Tensor parallel styles shard it
    like any linear; `amax_group` makes the tensorwise scales global over TP shards;
    `fsdp_float8_all_gather` makes FSDP gather its weight in float8."""

    recipe: str = "tensorwise"
    amax_group: dist.ProcessGroup | None = None
    fsdp_float8_all_gather: bool = False

    def fsdp_pre_all_gather(self, name: str, shard: torch.Tensor, group: dist.ProcessGroup):
        """fsdp.py hook: the weight shard cast to e4m3 with the scale of the whole
        weight (amax over the FSDP group and the TP group), or None (gather as usual)."""
        if name != "weight" or not self.fsdp_float8_all_gather or self.recipe != "tensorwise":
            return None
        amax = shard.abs().amax().float()
        for g in (group, self.amax_group):
            if g is not None and dist.get_world_size(g) > 1:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=g)  # comm: one float
        scale = (torch.finfo(E4M3).max / torch.clamp(amax.double(), min=EPS)).float()
        shard_f8 = torch.clamp(shard.float() * scale, -torch.finfo(E4M3).max, torch.finfo(E4M3).max).to(E4M3)
        return shard_f8, scale.reciprocal()

    def fsdp_post_all_gather(self, name: str, w_f8: torch.Tensor, w_inv: torch.Tensor, dtype: torch.dtype):
        """fsdp.py hook: the full weight to install. Its values are the dequantized
        float8 weight (right for any reader); forward uses `.float8` directly."""
        w = (w_f8.to(torch.float32) * w_inv).to(dtype)
        w.float8 = (w_f8, w_inv)
        return w

    def ring_matmuls(self, dtype: torch.dtype) -> Float8RingMatmuls:
        """Its GEMMs block by block, for tensor_parallel.py's async TP rings."""
        return Float8RingMatmuls(self.recipe, dtype, self.amax_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as nn.Linear would: compute in the autocast dtype
            x = x.to(torch.get_autocast_dtype(device))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K), M = all leading dims
        if x2.shape[0] % 16:
            raise ValueError(f"float8 linear: {x2.shape[0]} tokens per matmul (batch x sequence) must be "
                             f"divisible by 16 for the weight-gradient GEMM")
        w_float8 = getattr(self.weight, "float8", None)  # gathered in float8 by FSDP
        w = self.weight.to(x.dtype) if self.weight.dtype != x.dtype else self.weight
        # Autocast off inside: CPU autocast would round the dequantized operands of
        # _scaled_mm to bf16 before multiplying (the dtypes are already chosen here).
        with torch.autocast(device, enabled=False):
            out = Float8Matmul.apply(x2, w, self.recipe, self.amax_group, w_float8)
        return out.reshape(*shape[:-1], -1)


def check_float8_args(recipe: str, fsdp_float8_all_gather: bool) -> None:
    """Everything the float8 swap needs of the settings (no collective)."""
    if recipe not in RECIPES:
        raise ValueError(f"float8.recipe={recipe!r} does not exist; choose one of {list(RECIPES)}")
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise ValueError(f"float8.fsdp_float8_all_gather=true needs float8.recipe=tensorwise (got {recipe!r}): "
                         f"rowwise weights are gathered in high precision; set float8.recipe=tensorwise or "
                         f"float8.fsdp_float8_all_gather=false")


def convert_to_float8(model: nn.Module, recipe: str = "tensorwise", skip: tuple[str, ...] = ("output",),
                      amax_group: dist.ProcessGroup | None = None, fsdp_float8_all_gather: bool = False,
                      local_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None
                      ) -> list[tuple[str, str]]:
    """Swap every eligible nn.Linear of `model` for a Float8Linear holding the same
    weight Parameter. Returns (name, reason) for every linear left in high precision.
    local_shape(name, shape): the weight's shape once a later step (tensor parallel)
    has split it; _scaled_mm's rules apply to that shape."""
    check_float8_args(recipe, fsdp_float8_all_gather)
    skipped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        n, k = local_shape(name, tuple(module.weight.shape)) if local_shape else module.weight.shape
        per_rank = " per tensor-parallel rank" if local_shape else ""
        if name in skip or name.split(".")[-1] in skip:
            reason = "excluded by name (kept in high precision for accuracy)"
        elif module.bias is not None:
            reason = "has a bias (Float8Linear has none)"
        elif k % 16 or n % 16:
            reason = f"weight ({n}, {k}){per_rank}: _scaled_mm needs both dims divisible by 16"
        else:
            with torch.device("meta"):
                new = Float8Linear(*reversed(module.weight.shape), bias=False)
            new.weight = module.weight  # the same Parameter object: names, attributes, optimizer
            new.recipe, new.amax_group = recipe, amax_group
            new.fsdp_float8_all_gather = fsdp_float8_all_gather
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            continue
        skipped.append((name, reason))
    return skipped
