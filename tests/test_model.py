"""Tests of llama.py against independent references written here.

Every check compares against something llama.py did not compute: a naive attention
(explicit softmax with the causal mask, K/V heads repeated), Meta's complex-number RoPE
(llama-models' precompute_freqs_cis / apply_scaling / apply_rotary_emb), a functional
re-implementation of the whole decoder, published parameter counts, PyTorch's
FlopCounterMode, and the full-model init sliced by hand. Exactness checks run in
float64, where a correct implementation agrees to ~1e-10.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import llama
from llama import ModelArgs

# dim 64, 4 heads of 16 (theta 500000 puts the 8 frequencies of hd=16 in all three
# bands of Llama 3.1 scaling: kept, blended, divided by 8).
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=256)
TOL = dict(rtol=1e-10, atol=1e-10)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> llama.Transformer:
    args = TINY if not overrides else replace(TINY, **overrides)
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed)
    return model.to(dtype)


# ---------------------------------------------------------------------------------------
# Independent references


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v. q (B, H, S, hd); k, v (B, Hkv, S, hd); query
    head h reads KV head h // (H / Hkv), as Meta's repeat_kv."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, S, S)
    if causal:
        S = q.shape[2]
        scores = scores + torch.full((S, S), float("-inf"), dtype=q.dtype).triu(1)
    return torch.softmax(scores, dim=-1) @ v


def non_causal_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)


def meta_apply_scaling(freqs: torch.Tensor, scale_factor: float = 8.0, low_freq_factor: float = 1.0,
                       high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Meta llama-models' apply_scaling (Llama 3.1), element by element."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def meta_freqs_cis(dim: int, positions: torch.Tensor, theta: float, use_scaled: bool,
                   scale_factor: float = 8.0) -> torch.Tensor:
    """Meta's precompute_freqs_cis in float64, at arbitrary positions: (..., S, dim/2) complex."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    if use_scaled:
        freqs = meta_apply_scaling(freqs, scale_factor)
    angles = positions.to(torch.float64)[..., None] * freqs  # torch.outer(t, freqs), batched
    return torch.polar(torch.ones_like(angles), angles)


def meta_apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, hd); freqs_cis (S, hd/2) or (B, S, hd/2)."""
    x_ = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (B, S, heads, hd/2)
    freqs_cis = freqs_cis.unsqueeze(-2)  # broadcast over heads (reshape_for_broadcast)
    return torch.view_as_real(x_ * freqs_cis).flatten(3)


def meta_rope(args: ModelArgs, positions: torch.Tensor) -> torch.Tensor:
    return meta_freqs_cis(args.head_dim, positions, args.rope_theta, args.rope_scaling, args.rope_scaling_factor)


def naive_attention_block(x, wq, wk, wv, wo, freqs_cis, head_dim, causal=True):
    B, S, _ = x.shape
    q = (x @ wq.T).view(B, S, -1, head_dim)
    k = (x @ wk.T).view(B, S, -1, head_dim)
    v = (x @ wv.T).view(B, S, -1, head_dim)
    q, k = meta_apply_rotary_emb(q, freqs_cis), meta_apply_rotary_emb(k, freqs_cis)
    out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
    return out.transpose(1, 2).reshape(B, S, -1) @ wo.T


def naive_rmsnorm(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def naive_transformer(params: dict[str, torch.Tensor], args: ModelArgs, tokens: torch.Tensor,
                      positions: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """The whole decoder as plain tensor algebra over a {name: tensor} dict (Meta's names)."""
    if positions is None:
        positions = torch.arange(tokens.shape[1])
    freqs_cis = meta_rope(args, positions)
    h = params["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = {n[len(f"layers.{i}."):]: t for n, t in params.items() if n.startswith(f"layers.{i}.")}
        x = naive_rmsnorm(h, p["attention_norm.weight"], args.norm_eps)
        h = h + naive_attention_block(
            x, p["attention.wq.weight"], p["attention.wk.weight"], p["attention.wv.weight"],
            p["attention.wo.weight"], freqs_cis, args.head_dim, causal,
        )
        x = naive_rmsnorm(h, p["ffn_norm.weight"], args.norm_eps)
        gate = x @ p["feed_forward.w1.weight"].T
        h = h + (gate * torch.sigmoid(gate) * (x @ p["feed_forward.w3.weight"].T)) @ p["feed_forward.w2.weight"].T
    h = naive_rmsnorm(h, params["norm.weight"], args.norm_eps)
    return h @ params["output.weight"].T


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------------------------------
# 1, 4. Attention and GQA


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_causal_attention_matches_naive(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 12, 16, dtype=torch.float64, generator=g)
    k = torch.randn(2, kv_heads, 12, 16, dtype=torch.float64, generator=g)
    v = torch.randn(2, kv_heads, 12, 16, dtype=torch.float64, generator=g)
    torch.testing.assert_close(llama.causal_attention(q, k, v), naive_attention(q, k, v), **TOL)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_attention_module_forward_and_grads_match_naive(n_kv_heads):
    args = replace(TINY, n_kv_heads=n_kv_heads, rope_theta=10000.0)
    hd, kv = args.head_dim, args.kv_heads
    torch.manual_seed(0)
    attn = llama.Attention(args).to(torch.float64)
    # GQA shapes: K/V projections are Hkv heads wide.
    assert attn.wq.weight.shape == (args.n_heads * hd, args.dim)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (kv * hd, args.dim)
    assert attn.wo.weight.shape == (args.dim, args.n_heads * hd)

    ref = {n: p.detach().clone().requires_grad_() for n, p in attn.named_parameters()}
    x = torch.randn(2, 10, args.dim, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    positions = torch.arange(10)
    cos, sin = llama.rope_cos_sin(args, positions, torch.float64)
    dy = torch.randn(2, 10, args.dim, dtype=torch.float64)

    out = attn(x, cos, sin)
    out_ref = naive_attention_block(
        x_ref, ref["wq.weight"], ref["wk.weight"], ref["wv.weight"], ref["wo.weight"],
        meta_rope(args, positions), hd,
    )
    torch.testing.assert_close(out, out_ref, **TOL)
    out.backward(dy)
    out_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    for name, p in attn.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_attention_heads_follow_weight_width():
    """A tensor-parallel shard holding H/tp query heads and Hkv/tp KV heads (a row slice
    of wq/wk/wv, a column slice of wo) gives a partial output; the partials sum to the full."""
    args = TINY  # H 4, Hkv 2, hd 16; tp 2 -> heads {0,1} + KV head 0, heads {2,3} + KV head 1
    torch.manual_seed(0)
    full = llama.Attention(args).to(torch.float64)
    x = torch.randn(2, 8, args.dim, dtype=torch.float64)
    cos, sin = llama.rope_cos_sin(args, torch.arange(8), torch.float64)
    tp, hd = 2, args.head_dim
    q_rows, kv_rows = args.n_heads * hd // tp, args.kv_heads * hd // tp
    total = torch.zeros(2, 8, args.dim, dtype=torch.float64)
    for r in range(tp):
        shard = copy.deepcopy(full)
        with torch.no_grad():
            shard.wq.weight = nn.Parameter(full.wq.weight[r * q_rows:(r + 1) * q_rows].clone())
            shard.wk.weight = nn.Parameter(full.wk.weight[r * kv_rows:(r + 1) * kv_rows].clone())
            shard.wv.weight = nn.Parameter(full.wv.weight[r * kv_rows:(r + 1) * kv_rows].clone())
            shard.wo.weight = nn.Parameter(full.wo.weight[:, r * q_rows:(r + 1) * q_rows].clone())
        total += shard(x, cos, sin)
    torch.testing.assert_close(total, full(x, cos, sin), **TOL)


def test_transformer_matches_naive_with_every_gradient():
    """The whole model against the functional reference: logits, loss, every grad by name."""
    model = tiny_model()
    ref = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=g)
    targets = torch.randint(0, TINY.vocab_size, (2, 12), generator=g)

    logits = model(tokens)
    logits_ref = naive_transformer(ref, TINY, tokens)
    torch.testing.assert_close(logits, logits_ref, **TOL)
    loss_of(logits, targets).backward()
    loss_of(logits_ref, targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# 2. RoPE


ROPE_ARGS = [
    ModelArgs(dim=256, n_heads=2, rope_theta=500000.0, rope_scaling=True),  # hd 128, Llama 3.1
    ModelArgs(dim=256, n_heads=2, rope_theta=500000.0, rope_scaling=True, rope_scaling_factor=32.0),  # 3.2
    ModelArgs(dim=64, n_heads=4, rope_theta=500000.0, rope_scaling=True),  # hd 16
    ModelArgs(dim=64, n_heads=4, rope_theta=10000.0, rope_scaling=False),
]


@pytest.mark.parametrize("args", ROPE_ARGS, ids=["hd128-f8", "hd128-f32", "hd16-f8", "hd16-noscale"])
def test_rope_matches_meta(args):
    hd = args.head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 3, hd, dtype=torch.float64, generator=g)
    cases = {
        "arange": torch.arange(20),
        "given": torch.randint(0, 131072, (20,), generator=g),
        "per-batch": torch.stack([torch.randperm(20, generator=g) + 1000, torch.randint(0, 131072, (20,), generator=g)]),
    }
    for what, positions in cases.items():
        cos, sin = llama.rope_cos_sin(args, positions, torch.float64)
        ours = llama.apply_rope(x, cos, sin)
        theirs = meta_apply_rotary_emb(x, meta_rope(args, positions))
        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"{what}: {m}")


def test_rope_scaling_bands():
    """Meta's apply_scaling elementwise, and hd=128 hits all three bands (so the
    comparison above exercised each branch)."""
    args = ROPE_ARGS[0]
    base = 1.0 / (args.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    torch.testing.assert_close(llama.rope_inv_freq(args), meta_apply_scaling(base), rtol=1e-14, atol=0)
    wavelen = 2 * math.pi / base
    assert (wavelen < 2048).any() and (wavelen > 8192).any() and ((wavelen >= 2048) & (wavelen <= 8192)).any()


def test_rope_inv_freq_unscaled():
    for theta, hd in ((10000.0, 16), (500000.0, 128)):
        args = ModelArgs(dim=hd * 2, n_heads=2, rope_theta=theta, rope_scaling=False)
        i = torch.arange(hd // 2, dtype=torch.float64)
        torch.testing.assert_close(llama.rope_inv_freq(args), theta ** (-2 * i / hd), rtol=1e-14, atol=0)


def test_rope_relative_position():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    args = ROPE_ARGS[0]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, args.head_dim, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 1, args.head_dim, dtype=torch.float64, generator=g)

    def dot(m: int, n: int) -> float:
        cq, sq = llama.rope_cos_sin(args, torch.tensor([m]), torch.float64)
        ck, sk = llama.rope_cos_sin(args, torch.tensor([n]), torch.float64)
        return (llama.apply_rope(q, cq, sq) * llama.apply_rope(k, ck, sk)).sum().item()

    for delta in (0, 3, 77):
        values = [dot(n + delta, n) for n in (0, 5, 1000, 100000)]
        assert max(values) - min(values) < 1e-9, (delta, values)
    assert abs(dot(3, 0) - dot(77, 0)) > 1e-3  # and it does depend on m - n


# ---------------------------------------------------------------------------------------
# 3. Positions


def test_default_positions_are_arange():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(tokens)
    assert torch.equal(out, model(tokens, positions=torch.arange(12)))
    # Causal attention + RoPE only sees relative positions: a constant shift is invisible...
    torch.testing.assert_close(model(tokens, positions=torch.arange(12) + 4321), out, **TOL)
    # ...but positions do matter.
    assert not torch.allclose(model(tokens, positions=torch.arange(12) * 2), out, atol=1e-6)


def test_positions_with_permuted_tokens():
    """With non-causal attention, permuting tokens together with their positions
    permutes the outputs; matches the functional reference at those positions."""
    model = tiny_model()
    for block in model.layers.values():
        block.attention.attention_fn = non_causal_attention
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        full = model(tokens)
        perm = torch.randperm(12, generator=g)
        out = model(tokens[:, perm], positions=perm)
        torch.testing.assert_close(out, full[:, perm], **TOL)
        torch.testing.assert_close(out, naive_transformer(params, TINY, tokens[:, perm], perm, causal=False), **TOL)
        # Without the positions, the same permuted tokens give something else.
        assert not torch.allclose(model(tokens[:, perm]), full[:, perm], atol=1e-6)

        # (B, S) positions: a different permutation per sequence.
        perms = torch.stack([torch.randperm(12, generator=g) for _ in range(2)])
        rows = torch.stack([tokens[b, perms[b]] for b in range(2)])
        out = model(rows, positions=perms)
        for b in range(2):
            torch.testing.assert_close(out[b], full[b, perms[b]], **TOL)


# ---------------------------------------------------------------------------------------
# 5, 6. Counting


@pytest.mark.parametrize("name,total,ffn", [
    ("llama3_1b", 1_235_814_400 + 128256 * 2048, 8192),  # Llama 3.2 1B is tied; ours is not
    ("llama3_8b", 8_030_261_248, 14336),
    ("llama3_70b", 70_553_706_496, 28672),
    ("llama3_405b", 405_853_388_800, 53248),
])
def test_param_counts(name, total, ffn):
    args = llama.model_args(name)
    model = llama.build_model(args, "meta")
    assert sum(p.numel() for p in model.parameters()) == total
    assert llama.num_params(args) == total
    assert args.ffn_dim == ffn


def test_model_args_rejects_unknown_preset():
    with pytest.raises(ValueError, match="llama3_7b"):
        llama.model_args("llama3_7b")


def test_flops_per_token_against_flop_counter():
    """Training FLOPs of a forward+backward counted by FlopCounterMode. With the naive
    attention (counted as bmm), the total mm + bmm count equals flops_per_token exactly,
    except that the formula (like TorchTitan's) also counts 6 * the norm weights."""
    args = TINY
    model = tiny_model(dtype=torch.float32)
    for block in model.layers.values():
        block.attention.attention_fn = naive_attention
    B, S = 2, 16
    tokens = torch.randint(0, args.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    norm_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    linear_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * S
    assert counts["aten.mm"] == 6 * linear_params * B * S
    assert counts["aten.bmm"] == attention * B * S
    assert llama.flops_per_token(args, S) == 6 * (linear_params + norm_params) + attention
    assert (counts["aten.mm"] + counts["aten.bmm"]) / (B * S) == llama.flops_per_token(args, S) - 6 * norm_params


def test_flops_per_token_llama3_8b():
    args = llama.model_args("llama3_8b")
    n_matmul = 8_030_261_248 - 128256 * 4096
    assert llama.flops_per_token(args, 8192) == 6 * n_matmul + 12 * 32 * 32 * 128 * 8192
    assert round(llama.flops_per_token(args, 8192) / 1e9, 1) == 57.9  # TorchTitan's docs


# ---------------------------------------------------------------------------------------
# 7. Layout-independent init


def standin(params: dict[str, nn.Parameter]) -> nn.Module:
    """A module tree whose named_parameters() are exactly `params` (Meta's names)."""
    root = nn.Module()
    for name, p in params.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        mod.register_parameter(leaf, p)
    return root


def shard(full_shape: torch.Size, offset: tuple[int, ...], local_shape: tuple[int, ...]) -> nn.Parameter:
    p = nn.Parameter(torch.full(local_shape, float("nan")))  # init must overwrite everything
    p.global_shape = torch.Size(full_shape)
    p.global_offset = offset
    return p


def expected_slice(full: torch.Tensor, offset: tuple[int, ...], local_shape: tuple[int, ...]) -> torch.Tensor:
    """The slice of `full` at offset, zero-padded to local_shape where it runs past the end."""
    out = torch.zeros(local_shape, dtype=full.dtype)
    src = full[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
    out[tuple(slice(0, s) for s in src.shape)] = src
    return out


INIT_NAMES = [
    "tok_embeddings.weight",  # normal(0, 1)
    "output.weight",  # trunc-normal dim^-0.5
    "layers.1.attention.wo.weight",  # depth-scaled
    "layers.0.feed_forward.w1.weight",  # 0.02
    "layers.1.feed_forward.w2.weight",  # depth-scaled, (dim, ffn)
    "norm.weight",  # ones
    "layers.0.attention_norm.weight",  # ones
]


@pytest.mark.parametrize("rows_per_stream_elems", [None, 64 * 5], ids=["default", "5-row-blocks"])
def test_init_is_layout_independent(monkeypatch, rows_per_stream_elems):
    if rows_per_stream_elems is not None:  # several random streams per parameter, cut by shards
        monkeypatch.setattr(llama, "_ROWS_PER_STREAM_ELEMS", rows_per_stream_elems)
    args = TINY
    full = llama.build_model(args, "cpu")
    llama.init_weights(full, args, seed=7)
    full_params = dict(full.named_parameters())

    def rows(n: str, world: int, r: int):  # dim 0 (FSDP-like): ceil(rows / world) each, last padded
        shape = full_params[n].shape
        per = -(-shape[0] // world)
        return (r * per,) + (0,) * (len(shape) - 1), (per, *shape[1:])

    def cols(n: str, world: int, r: int):  # dim 1 (TP row-parallel-like)
        n_rows, n_cols = full_params[n].shape
        return (0, r * n_cols // world), (n_rows, n_cols // world)

    matrices = [n for n in INIT_NAMES if full_params[n].dim() == 2]
    layouts = [[{n: rows(n, world, r) for n in INIT_NAMES} for r in range(world)] for world in (3, 4, 5)]
    layouts += [[{n: cols(n, world, r) for n in matrices} for r in range(world)] for world in (2, 4)]
    # 2-D: TP on dim 1 then padded FSDP on dim 0 of wo (64 rows / 3 ranks).
    layouts.append([{"layers.1.attention.wo.weight": ((f * 22, t * 32), (22, 32))}
                    for t in range(2) for f in range(3)])

    for layout in layouts:
        for rank in layout:
            params = {n: shard(full_params[n].shape, off, shape) for n, (off, shape) in rank.items()}
            llama.init_weights(standin(params), args, seed=7)
            for n, (off, shape) in rank.items():
                want = expected_slice(full_params[n].detach(), off, shape)
                assert torch.equal(params[n].detach(), want), (n, off, shape)
    # a padded last shard really was exercised, and its padding is zero
    p = shard(full_params["norm.weight"].shape, (60,), (8,))
    llama.init_weights(standin({"norm.weight": p}), args, seed=7)
    assert torch.equal(p.detach(), torch.tensor([1.0] * 4 + [0.0] * 4))
    # shards lying wholly past the end (more ranks than rows) are all zeros
    for n in ("norm.weight", "output.weight", "layers.1.attention.wo.weight"):
        g = full_params[n].shape
        p = shard(g, (g[0] + 3,) + (0,) * (len(g) - 1), (5, *g[1:]))
        llama.init_weights(standin({n: p}), args, seed=7)
        assert torch.equal(p.detach(), torch.zeros_like(p)), n


def test_init_seed_dependence():
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa)) and torch.equal(pa, pc), name
        else:
            assert not torch.equal(pa, pc), name
    # different parameters of the same shape get different streams
    assert not torch.equal(a.layers["0"].attention.wq.weight, a.layers["1"].attention.wq.weight)
    assert not torch.equal(a.layers["0"].feed_forward.w1.weight, a.layers["0"].feed_forward.w3.weight)


# ---------------------------------------------------------------------------------------
# 8, 9, 10. Hooks: pipeline stages, activation checkpointing, bf16


def test_pipeline_stages_chain_to_full_model():
    full = tiny_model(n_layers=4)
    names = [n for n, _ in full.named_parameters()]
    k = 2
    first = copy.deepcopy(full)
    for i in range(k, 4):
        del first.layers[str(i)]
    first.norm = first.output = None
    second = copy.deepcopy(full)
    second.tok_embeddings = None
    for i in range(k):
        del second.layers[str(i)]
    # survivors keep their global names
    assert [n for n, _ in first.named_parameters()] == [n for n in names if n.startswith("tok_") or
                                                        any(n.startswith(f"layers.{i}.") for i in range(k))]
    assert [n for n, _ in second.named_parameters()] == [n for n in names if n.startswith(("norm.", "output.")) or
                                                         any(n.startswith(f"layers.{i}.") for i in range(k, 4))]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 10), generator=g)
    targets = torch.randint(0, TINY.vocab_size, (2, 10), generator=g)
    hidden = first(tokens)
    assert hidden.shape == (2, 10, TINY.dim)
    logits = second(hidden)
    want = full(tokens)
    assert torch.equal(logits, want)
    loss_of(logits, targets).backward()
    loss_of(want, targets).backward()
    stage_grads = {**dict(first.named_parameters()), **dict(second.named_parameters())}
    for name, p in full.named_parameters():
        assert torch.equal(stage_grads[name].grad, p.grad), name
    # and with explicit positions
    pos = torch.randperm(10, generator=g)
    assert torch.equal(second(first(tokens, pos), pos), full(tokens, pos))


def test_checkpoint_fn_is_bitwise_identical():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 10), generator=g)
    targets = torch.randint(0, TINY.vocab_size, (2, 10), generator=g)
    plain, ckpt = tiny_model(dtype=torch.float32), tiny_model(dtype=torch.float32)
    for block in ckpt.layers.values():
        block.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    loss_plain = loss_of(plain(tokens), targets)
    loss_plain.backward()
    calls = []
    for block in ckpt.layers.values():  # the hook is really used (and recomputes in backward)
        block.register_forward_pre_hook(lambda *_: calls.append(1))
        block.attention.register_forward_pre_hook(lambda *_: calls.append(2))
    loss_ckpt = loss_of(ckpt(tokens), targets)
    loss_ckpt.backward()
    assert calls.count(2) == 2 * TINY.n_layers  # forward + recompute
    assert torch.equal(loss_plain, loss_ckpt)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_bf16_autocast_close_to_float32():
    model = tiny_model(dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    want = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens)
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    rel = (got.float() - want).norm() / want.norm()
    assert 0 < rel < 1e-2, rel.item()  # measured 0.003
    loss_of(got.float(), tokens).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_init_std_is_torchtitans():
    """Every tensor's std equals TorchTitan's Llama 3 init within sampling error: block
    projections N(0, 0.02) (wo / w2 / w3 depth-scaled by 1 / sqrt(2 (layer + 1))) with
    trunc_normal_'s default +-2 absolute bounds, i.e. untruncated at these stds; the output
    trunc-normal dim^-0.5 cut at +-3 std (std factor sqrt(1 - 2 c phi(c) / (2 Phi(c) - 1))
    = 0.98658 at c = 3); embeddings N(0, 1); norms ones. A std estimate over n samples has
    relative standard error 1 / sqrt(2 n): 0.07% for the 1M-element matrices here, so the
    5-sigma bound (0.35%) tells the 1.3% of a +-3 std cut on the block projections."""
    args = llama.model_args("debug", dim=1024, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024)
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed=0)
    c = 3.0
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    cut3 = math.sqrt(1 - 2 * c * phi / math.erf(c / math.sqrt(2)))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        if name.startswith("tok_embeddings"):
            want = 1.0
        elif name.startswith("output"):
            want = args.dim**-0.5 * cut3
        elif name.endswith(("wo.weight", "w2.weight", "w3.weight")):
            want = 0.02 / math.sqrt(2 * (int(name.split(".")[1]) + 1))
        else:
            want = 0.02
        got = p.double().std().item()
        assert abs(got / want - 1) < 5 / math.sqrt(2 * p.numel()), (name, got, want)
        assert abs(p.double().mean().item()) < 5 * want / math.sqrt(p.numel()), name
    assert model.output.weight.abs().max().item() <= 3 * args.dim**-0.5 + 1e-7
