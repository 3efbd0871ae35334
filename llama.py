"""Llama 3 / 3.1, with Meta's parameter names, built to be parallelized from outside.

What it does
    The decoder-only transformer of "The Llama 3 Herd of Models": RMSNorm (pre-norm),
    rotary position embeddings with Llama 3.1 frequency scaling, grouped-query attention
    and a SwiGLU feed-forward. Parameter names follow Meta's checkpoints, so a state
    dict converted from Meta's release loads by name:

        tok_embeddings.weight                        (vocab, dim)
        layers.<i>.attention_norm.weight             (dim,)
        layers.<i>.attention.{wq,wk,wv,wo}.weight    wq (H*hd, dim), wk/wv (Hkv*hd, dim), wo (dim, H*hd)
        layers.<i>.ffn_norm.weight                   (dim,)
        layers.<i>.feed_forward.{w1,w2,w3}.weight    w1/w3 (ffn, dim), w2 (dim, ffn)
        norm.weight                                  (dim,)
        output.weight                                (vocab, dim)

Hooks the parallel techniques use (none of them is imported here)
    * `layers` is an nn.ModuleDict keyed by the layer index ("0", "1", ...): a pipeline
      stage deletes the layers it does not own and the survivors keep their names.
      `tok_embeddings`, `norm` and `output` may be set to None on a stage; `forward` then
      passes the hidden state through.
    * Attention reads the number of heads from the width of wq's output, so a
      tensor-parallel wq holding H/tp heads just works (same for wk/wv and KV heads).
    * `Attention.attention_fn(q, k, v)` is a replaceable attribute; the default is causal
      `F.scaled_dot_product_attention`. Context parallelism swaps in ring attention.
    * `input_proj_fn(x, linears) -> outputs` (wq/wk/wv of Attention, w1/w3 of FeedForward:
      the projections that read the same input), `output_proj_fn(x, linear)` (wo, w2) and
      the Transformer's `output_fn(h, linear)` (the output projection) are replaceable
      attributes too; the defaults call the linears. Tensor parallelism puts its
      collectives there (one all-gather for the three of wq/wk/wv, not three), as named by
      its plan (tensor_parallel.LLAMA_PLAN), so no forward hook hides a collective.
    * `forward(tokens, positions)` accepts the RoPE position of every token, for a rank
      that holds a non-contiguous piece of the sequence (load-balanced CP).
    * Layout-independent init (`init_weights`): every parameter is filled from random
      streams keyed by (seed, parameter name, row block) over its GLOBAL shape. A technique
      that replaces a parameter by a slice of it records where the slice sits by setting
      two plain attributes on the new parameter:
          p.global_shape  = torch.Size of the unsharded parameter
          p.global_offset = tuple, the global index of the local p[0, 0, ...]
      (rows beyond the global shape are padding and are zero-filled). So every layout
      starts from the same global weights as one process, with no seed checkpoint.
      The streams are drawn on the parameter's device: CUDA and CPU generators differ,
      so a GPU run starts from other (equally distributed) weights than a CPU run.

Math and shapes (B batch, S sequence, H query heads, Hkv KV heads, hd head dim)
    h = x + wo(attn(rope(wq(norm(x))), rope(wk(norm(x))), wv(norm(x))))
    out = h + w2(silu(w1(norm(h))) * w3(norm(h)))
    RoPE rotates interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i], as Meta's
    complex-number code does; it is written here with real cos / sin so it runs in any
    dtype (float64 for exactness tests) and under torch.compile.

What TorchTitan does that this file does not
    No weight tying (Llama 3.2 1B ties embeddings; our llama3_1b preset is untied so
    pipeline stages stay independent), no MoE, no flex / document-masked attention.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    vocab_size: int = 128256
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: bool = True  # Llama 3.1 long-context frequency scaling
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 131072  # the longest context the preset was trained for

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        # Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


PRESETS: dict[str, ModelArgs] = {
    # Trains on a 2-core CPU in minutes; vocab 4096 = the builtin tokenizer (data.py).
    "debug": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=64,
        rope_theta=10000.0, rope_scaling=False, max_seq_len=4096,
    ),
    # Llama 3.2 1B shapes (rope factor 32), untied output.
    "llama3_1b": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
        ffn_dim_multiplier=1.5, rope_scaling_factor=32.0,
    ),
    "llama3_8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
        ffn_dim_multiplier=1.3,
    ),
    "llama3_70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3,
    ),
    "llama3_405b": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.2,
    ),
}


def model_args(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"model.name={name!r} is not a preset; choose one of {sorted(PRESETS)}")
    args = replace(PRESETS[name], **overrides)
    if args.dim % args.n_heads:
        raise ValueError(f"model.dim={args.dim} is not divisible by model.n_heads={args.n_heads}")
    if args.head_dim % 2:
        raise ValueError(f"head dim {args.head_dim} (model.dim / model.n_heads) must be even for RoPE")
    if args.n_heads % args.kv_heads:
        raise ValueError(f"model.n_heads={args.n_heads} is not divisible by model.n_kv_heads={args.kv_heads}")
    return args


# ---------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(args: ModelArgs, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-pair rotation frequencies (hd/2,), with Llama 3.1's long-context scaling:
    wavelengths longer than original_max_len/low_freq_factor are slowed by `factor`,
    shorter than original_max_len/high_freq_factor kept, and the band between blended."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if args.rope_scaling:
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = args.rope_original_max_len / args.rope_low_freq_factor
        high_wavelen = args.rope_original_max_len / args.rope_high_freq_factor
        smooth = (args.rope_original_max_len / wavelen - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / args.rope_scaling_factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / args.rope_scaling_factor, inv_freq)
        in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(in_band, blended, inv_freq)
    return inv_freq.to(dtype)


def rope_cos_sin(
    args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * inv_freq, each (..., S, hd/2), computed in float64 for
    exact angles at long positions, then cast to the compute dtype."""
    inv_freq = rope_inv_freq(args).to(positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., S, hd/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, heads, hd) by cos / sin ((B or 1), S, hd/2)."""
    x_pairs = x.unflatten(-1, (-1, 2))  # (B, S, heads, hd/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)  # (B, S, heads, hd)


# ---------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in at least float32 (as Meta does), then return in the input dtype.
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Default attention_fn. q (B, H, S, hd); k, v (B, Hkv, S, hd) -> (B, H, S, hd)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def apply_linears(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Default input_proj_fn: the projections that read the same input (wq/wk/wv, w1/w3)."""
    return [linear(x) for linear in linears]


def apply_linear(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """Default output_proj_fn (wo, w2: back into the residual stream) and output_fn."""
    return linear(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Replaceable: context parallelism sets its ring attention here; tensor parallelism
        # sets the projections (their collectives, and async TP's fused gather-matmul).
        self.attention_fn: Callable[..., torch.Tensor] = causal_attention
        self.input_proj_fn: Callable[..., list[torch.Tensor]] = apply_linears
        self.output_proj_fn: Callable[..., torch.Tensor] = apply_linear

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        # Head counts come from the weights, so tensor-parallel shards (H/tp heads) work.
        q, k, v = self.input_proj_fn(x, (self.wq, self.wk, self.wv))
        S = q.shape[1]  # the full sequence, also when x holds a sequence-parallel shard
        q = q.view(B, S, -1, self.head_dim)  # (B, S, H, hd)
        k = k.view(B, S, -1, self.head_dim)  # (B, S, Hkv, hd)
        v = v.view(B, S, -1, self.head_dim)  # (B, S, Hkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(B, S, -1)  # (B, S, H*hd)
        return self.output_proj_fn(out, self.wo)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        # Replaceable, as in Attention (tensor parallelism).
        self.input_proj_fn: Callable[..., list[torch.Tensor]] = apply_linears
        self.output_proj_fn: Callable[..., torch.Tensor] = apply_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_proj_fn(x, (self.w1, self.w3))
        return self.output_proj_fn(F.silu(gate) * up, self.w2)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

        # Activation checkpointing (train.py) sets this to a function run(fn, *args), e.g.
        # torch.utils.checkpoint.checkpoint; set here rather than by wrapping the block so
        # that parameter names stay Meta's.
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_fn is not None:
            return self.checkpoint_fn(self._forward, x, cos, sin)
        return self._forward(x, cos, sin)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Replaceable, as in Attention (tensor parallelism: the vocabulary-parallel output).
        self.output_fn: Callable[..., torch.Tensor] = apply_linear

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, S) int64 -> logits (B, S, vocab). On a pipeline stage without
        tok_embeddings, `tokens` is the hidden state (B, S, dim); without `output`, the
        hidden state is returned. positions: (S,) or (B, S) RoPE positions, default 0..S-1
        (a stage fed a sequence-parallel hidden state (B, S/tp, dim) must pass them)."""
        if positions is None:  # from the ids: under sequence parallel h holds S/tp of them
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # RoPE is applied in float32 (float64 in exactness runs), as Meta does.
        rope_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(self.args, positions, rope_dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output_fn(h, self.output) if self.output is not None else h


# ---------------------------------------------------------------------------------------
# Layout-independent initialization

_ROWS_PER_STREAM_ELEMS = 1 << 22  # a random stream covers ~4M elements of whole rows


def _init_spec(name: str, args: ModelArgs) -> tuple[str, float, float]:
    """(kind, std, cutoff) of a parameter, as TorchTitan's Llama 3 init: embeddings
    N(0, 1); the output projection trunc-normal dim^-0.5 cut at +-3 std; input
    projections trunc-normal 0.02; the projections writing into the residual stream (wo,
    w2, and w3 as TorchTitan does) 0.02 / sqrt(2 * (layer_id + 1)) (depth-scaled); norms
    ones. TorchTitan's block projections use trunc_normal_'s default bounds, +-2
    absolute: 100 std and more at these stds, so in effect no truncation (a +-3 std cut
    would make them 1.3% smaller in std)."""
    if name.endswith("norm.weight"):
        return "ones", 0.0, 0.0
    if name.startswith("tok_embeddings."):
        return "normal", 1.0, math.inf
    if name.startswith("output."):
        return "trunc_normal", args.dim**-0.5, 3 * args.dim**-0.5
    layer_id = int(name.split(".")[1])
    if name.endswith(("wo.weight", "w2.weight", "w3.weight")):
        return "trunc_normal", 0.02 / math.sqrt(2 * (layer_id + 1)), 2.0
    return "trunc_normal", 0.02, 2.0


def _stream_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(model: nn.Module, args: ModelArgs, seed: int) -> None:
    """Fill every parameter of `model` (already materialized, e.g. with to_empty) with
    its slice of the global weights. Each global parameter is cut into blocks of whole
    rows, each block drawn from its own generator seeded by (seed, name, block); a rank
    draws only the blocks its slice touches and copies out the overlap. So the global
    weights do not depend on how they are sharded, and no rank builds a whole tensor."""
    for name, p in model.named_parameters():
        kind, std, cutoff = _init_spec(name, args)
        global_shape = tuple(getattr(p, "global_shape", p.shape))
        offset = tuple(getattr(p, "global_offset", (0,) * p.dim()))
        p.zero_()  # padding rows (beyond the global shape) stay zero
        row0 = offset[0]
        row1 = min(offset[0] + p.shape[0], global_shape[0])  # exclusive, padding excluded
        if kind == "ones":
            p[: max(0, row1 - row0)] = 1.0
            continue
        if row1 <= row0:  # this shard is all padding
            continue
        row_elems = math.prod(global_shape[1:])
        rows_per_block = max(1, _ROWS_PER_STREAM_ELEMS // max(1, row_elems))
        # The local index of every non-leading dim, clipped to the global extent.
        inner = tuple(
            slice(o, min(o + n, g)) for o, n, g in zip(offset[1:], p.shape[1:], global_shape[1:])
        )
        for block in range(row0 // rows_per_block, (row1 - 1) // rows_per_block + 1):
            b0 = block * rows_per_block
            b1 = min(b0 + rows_per_block, global_shape[0])
            gen = torch.Generator(device=p.device).manual_seed(_stream_seed(seed, name, block))
            rows = torch.empty((b1 - b0, *global_shape[1:]), dtype=torch.float32, device=p.device)
            if kind == "normal":
                rows.normal_(0.0, std, generator=gen)
            else:
                nn.init.trunc_normal_(rows, 0.0, std, -cutoff, cutoff, generator=gen)
            lo, hi = max(b0, row0), min(b1, row1)
            src = rows[(slice(lo - b0, hi - b0), *inner)]
            p[(slice(lo - row0, hi - row0), *(slice(0, s.stop - s.start) for s in inner))] = src.to(p.dtype)


@torch.no_grad()
def materialize(model: nn.Module, device: str | torch.device) -> None:
    """Allocate (uninitialized) storage on `device` for a model built on meta, keeping
    every Parameter object and the attributes techniques set on it (global_shape,
    global_offset, ...). nn.Module.to_empty would create new Parameter objects, losing
    both the attributes and the identity that FSDP and optimizers hold on to."""
    for p in model.parameters():
        attrs = dict(p.__dict__)
        new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        torch.utils.swap_tensors(p, new)  # swaps the contents and the __dict__
        p.__dict__.update(attrs)
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty_like(b, device=device)


def build_model(args: ModelArgs, device: str | torch.device = "meta") -> Transformer:
    """Construct on `device` (default meta: shapes only, no memory)."""
    with torch.device(device):
        return Transformer(args)


# ---------------------------------------------------------------------------------------
# Counting


def num_params(args: ModelArgs) -> int:
    """Total parameters (embedding and output counted separately: no tying)."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    ffn = 3 * args.dim * args.ffn_dim
    layer = attn + ffn + 2 * args.dim
    return args.n_layers * layer + 2 * args.vocab_size * args.dim + args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as TorchTitan and the
    PaLM paper count them:  6 * N_matmul + 12 * L * H * hd * S.
    N_matmul = all parameters except the input embedding (a lookup, not a matmul); the
    output projection is included. 12*L*H*hd*S is the attention score and value matmuls
    (2 * 2*H*hd*S per token per layer forward, times 3). Not counted: causal sparsity
    (the real attention work is about half), norms, RoPE, softmax, activation
    recomputation (so this gives MFU, not hardware FLOPs utilization)."""
    n_matmul = num_params(args) - args.vocab_size * args.dim
    return 6 * n_matmul + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
