"""Hugging Face Llama checkpoints in and out: a HF folder (config.json + *.safetensors)
becomes a state dict with Meta's names that `checkpoint.initial` starts from, and a
checkpoint becomes a HF folder that `LlamaForCausalLM.from_pretrained` loads.

    python checkpoint.py from-hf HF_DIR OUT.pt                   # prints the model.* settings
    python checkpoint.py to-hf RUN/checkpoints/step-N OUT_DIR    # the model from the run's config
    python checkpoint.py to-hf OUT.pt OUT_DIR model.name=debug model.dim=64 ...
    state, name, overrides, notes = from_hf(hf_dir)
    files = to_hf(state, name, overrides, out_dir, max_shard_bytes=5 * 10**9)

Names (HF -> Meta, as llama.py), N = layer
    model.embed_tokens.weight                          tok_embeddings.weight
    model.layers.N.input_layernorm.weight              layers.N.attention_norm.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.weight     layers.N.attention.{wq,wk,wv,wo}.weight
    model.layers.N.post_attention_layernorm.weight     layers.N.ffn_norm.weight
    model.layers.N.mlp.{gate,down,up}_proj.weight      layers.N.feed_forward.{w1,w2,w3}.weight
    model.norm.weight                                  norm.weight
    lm_head.weight                                     output.weight
    (model.layers.N.self_attn.rotary_emb.inv_freq, kept by old HF exports, is derived: dropped.)

The q/k row permutation
    llama.py rotates interleaved pairs (x[2i], x[2i+1]) of a head, as Meta's code does;
    HF's rotate_half rotates (x[i], x[i + hd/2]). HF's convert_llama_weights_to_hf.py
    therefore reorders the rows of wq and wk inside every head (H heads of hd rows; H = KV
    heads for wk) so that HF's halves hold Meta's even and odd rows:
        hf   = meta.view(H, hd/2, 2, dim).transpose(1, 2).reshape(H*hd, dim)   # row 2i+j -> j*hd/2 + i
        meta = hf.view(H, 2, hd/2, dim).transpose(1, 2).reshape(H*hd, dim)
    q.k is a sum over a head's rows, so the same reorder of q and k leaves attention
    unchanged; wv, wo and everything else keep their layout. Pure data movement: a round
    trip is bitwise.

Config (config.json <-> llama.ModelArgs)
    hidden_size -> dim, num_hidden_layers -> n_layers, num_attention_heads -> n_heads,
    num_key_value_heads -> n_kv_heads, vocab_size, rms_norm_eps -> norm_eps, rope_theta,
    max_position_embeddings -> max_seq_len; rope_scaling (or transformers 5's
    rope_parameters) of rope_type "llama3" -> rope_scaling_factor, rope_low_freq_factor,
    rope_high_freq_factor, rope_original_max_len (no scaling: rope_scaling false). Keys a
    file leaves out take LlamaConfig's defaults (rms_norm_eps 1e-6, rope_theta 10000, ...).
    intermediate_size: llama.py derives the FFN size from dim (ModelArgs.ffn_dim), so we
    look for the (ffn_dim_multiplier, multiple_of) that gives it: the presets' pairs, no
    multiplier with multiple_of a power of two, or multiple_of = intermediate_size itself.
    The printed model.* settings are the fewest overrides of the closest preset. Written
    back: the same keys (rope in the hub's rope_theta / rope_scaling form), torch_dtype the
    tensors' dtype, bos / eos = vocab_size - 256 / - 255 (data.py puts the 256 special
    tokens after the base ranks: Llama 3's 128000 / 128001).

Tied embeddings (Llama 3.2 1B / 3B: tie_word_embeddings, no lm_head.weight)
    llama.py has no tying, so from_hf unties: output.weight is a copy of the embedding
    (a note says so; they are trained apart from then on) and to_hf writes an untied model.

Files
    In: model.safetensors, or the shards named by model.safetensors.index.json's
    weight_map, or else every *.safetensors in the folder. Out: model-0000i-of-0000n
    .safetensors, each at most max_shard_bytes (HF's 5 GB by default; a bigger tensor gets
    a shard of its own), and the index. Tensors keep their dtype (a bfloat16 checkpoint
    stays bfloat16: training casts to its master dtype on load) unless to_hf is given one.

Errors a user can cause (no folder, no config.json, another architecture, a tensor
missing or of another shape than config.json implies) raise ValueError naming the file
and key; checkpoint.py's main prints them as `error: ...` and exits 2.

Requirements: torch, the standard library, llama.py (torch only) and safetensors
(imported where used). Left out: other architectures (attention or MLP biases, a
head_dim other than hidden_size / heads, rope types other than llama3), PyTorch .bin
checkpoints, generation_config.json and tokenizer files (data.py reads tokenizer.json).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import torch

import llama

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size, "5GB"
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attention_norm.weight",
          "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
          "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
          "mlp.up_proj.weight": "feed_forward.w3.weight"}
_HF_LAYER, _META_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$"), re.compile(r"^layers\.(\d+)\.(.+)$")


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("reading and writing Hugging Face checkpoints needs safetensors: "
                          "pip install safetensors") from None
    return safetensors.torch


# ---------------------------------------------------------------------------------------
# Names and the q/k permutation

def meta_name(hf_name: str) -> str | None:
    """llama.py's name of a HF tensor; None if it is not one of a Llama's parameters."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _HF_LAYER.match(hf_name)
    return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}" if m and m.group(2) in _LAYER else None


def hf_name(name: str) -> str:
    """The HF name of a llama.py parameter."""
    inverse_top = {v: k for k, v in _TOP.items()}
    if name in inverse_top:
        return inverse_top[name]
    m = _META_LAYER.match(name)
    inverse = {v: k for k, v in _LAYER.items()}
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}"


def _heads(name: str, args: llama.ModelArgs) -> int | None:
    """How many heads' rows to reorder: wq has n_heads, wk the KV heads, others none."""
    return args.n_heads if name.endswith("wq.weight") else args.kv_heads if name.endswith("wk.weight") else None


def hf_to_meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo HF's rotate-half row order: per head, rows [evens..., odds...] -> interleaved."""
    rows, dim = w.shape
    return w.view(heads, 2, rows // heads // 2, dim).transpose(1, 2).reshape(rows, dim)  # (H, hd/2, 2, dim)


def meta_to_hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's order (convert_llama_weights_to_hf.py's permute): per head, evens then odds."""
    rows, dim = w.shape
    return w.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)  # (H, 2, hd/2, dim)


def expected_shapes(args: llama.ModelArgs) -> dict[str, tuple[int, ...]]:
    """llama.py's parameter shapes for these args (built on meta: no memory)."""
    return {n: tuple(p.shape) for n, p in llama.build_model(args, "meta").named_parameters()}


# ---------------------------------------------------------------------------------------
# config.json <-> ModelArgs

def _ffn_settings(dim: int, intermediate: int, where: str) -> list[dict]:
    """Every (ffn_dim_multiplier, multiple_of) we try whose ModelArgs.ffn_dim is intermediate.
    HF stores the FFN size, llama.py (as Meta's params.json) the rule that gives it, so we
    search: the presets' multipliers (Meta's releases), multiple_of from 4096 down to 1,
    and multiple_of = intermediate itself (any size >= int(8 dim / 3))."""
    multipliers = [None] + sorted({p.ffn_dim_multiplier for p in llama.PRESETS.values()} - {None})
    tries = [(m, 2**k) for m in multipliers for k in range(12, -1, -1)] + [(None, intermediate)]
    fits = [dict(ffn_dim_multiplier=m, multiple_of=k) for m, k in tries
            if llama.ModelArgs(dim=dim, ffn_dim_multiplier=m, multiple_of=k).ffn_dim == intermediate]
    if not fits:
        raise ValueError(f"{where}: intermediate_size={intermediate} is not a FFN size llama.py builds for "
                         f"hidden_size={dim}: it uses multiple_of * ceil(int(m * int(8 * dim / 3)) / multiple_of) "
                         f"(int(8 * dim / 3) = {int(8 * dim / 3)}), and no multiple_of (a power of two or "
                         f"{intermediate}) with m in {multipliers} gives {intermediate}; this model's FFN does "
                         "not fit llama.py")
    return fits


def _rope_settings(cfg: dict, where: str) -> dict:
    params = cfg.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=False)
    if kind != "llama3":
        raise ValueError(f"{where}: rope_type {kind!r} is not supported; llama.py has Llama 3.1's 'llama3' "
                         "frequency scaling or none")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"{where}: the llama3 rope scaling has no {missing}; it needs {list(keys)}")
    return dict(rope_theta=theta, rope_scaling=True, rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_len=int(scaling["original_max_position_embeddings"]))


def model_settings(cfg: dict, where: str) -> tuple[str, dict]:
    """(preset name, ModelArgs overrides) that build the model config.json describes:
    the preset needing the fewest overrides. ValueError if llama.py cannot build it."""
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
        raise ValueError(f"{where}: model_type {cfg.get('model_type')!r}, architectures {arch}: only "
                         "LlamaForCausalLM (model_type 'llama') converts to llama.py")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"{where}: {key} is {cfg.get(key)!r}; a Llama config.json gives a positive integer")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if dim % heads or heads % kv:
        raise ValueError(f"{where}: hidden_size={dim}, num_attention_heads={heads}, num_key_value_heads={kv}: "
                         "llama.py needs heads to divide hidden_size and KV heads to divide heads")
    unsupported = {"head_dim": dim // heads, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for key, value in unsupported.items():
        if cfg.get(key) is not None and cfg[key] != value:  # absent or null: LlamaConfig's default
            raise ValueError(f"{where}: {key}={cfg[key]!r}; llama.py builds only {key}={value!r}")
    want = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads, n_kv_heads=kv,
                vocab_size=cfg["vocab_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_seq_len=int(cfg.get("max_position_embeddings", 2048)), **_rope_settings(cfg, where))
    ffns, best = _ffn_settings(dim, cfg["intermediate_size"], where), None
    for name, preset in llama.PRESETS.items():
        for ffn in ffns:
            overrides = {k: v for k, v in {**want, **ffn}.items() if getattr(preset, k) != v}
            if best is None or len(overrides) < len(best[1]):
                best = (name, overrides)
    return best


def hf_config(args: llama.ModelArgs, dtype: torch.dtype) -> dict:
    """config.json of a LlamaForCausalLM with these args (the hub's Llama 3.1 keys)."""
    scaling = dict(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=args.rope_low_freq_factor,
                   high_freq_factor=args.rope_high_freq_factor,
                   original_max_position_embeddings=args.rope_original_max_len)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
               intermediate_size=args.ffn_dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
               num_key_value_heads=args.kv_heads, head_dim=args.head_dim, vocab_size=args.vocab_size,
               rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
               rope_scaling=scaling if args.rope_scaling else None, max_position_embeddings=args.max_seq_len,
               hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
               torch_dtype=str(dtype).removeprefix("torch."))
    if args.vocab_size > 256:  # data.py's layout: the 256 special tokens follow the base ranks
        cfg.update(bos_token_id=args.vocab_size - 256, eos_token_id=args.vocab_size - 255)
    return cfg


def settings_text(name: str, overrides: dict) -> tuple[str, str]:
    """The model settings as a YAML `model:` section and as key=value overrides."""
    def text(v) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)
    items = [("name", name)] + list(overrides.items())
    yaml = "model:\n" + "".join(f"  {k}: {v if k == 'name' else text(v)}\n" for k, v in items)
    return yaml, " ".join(f"model.{k}={v if k == 'name' else text(v)}" for k, v in items)


def _value(raw: str):
    """A key=value value: null / true / false, an int, a float, else the string."""
    literal = {"null": None, "none": None, "true": True, "false": False}
    if raw.lower() in literal:
        return literal[raw.lower()]
    for parse in (int, float):
        try:
            return parse(raw)
        except ValueError:
            pass
    return raw


def parse_settings(items: list[str], source: str) -> tuple[str, dict]:
    """model.name=... model.<ModelArgs field>=... (what from-hf prints) -> (name, overrides)."""
    defaults = {f.name: f.default for f in dataclasses.fields(llama.ModelArgs)}
    name, overrides = None, {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.removeprefix("model.")
        if not eq or (key != "name" and key not in defaults):
            raise ValueError(f"{item!r}: expected model.name=PRESET or model.FIELD=VALUE, FIELD one of "
                             f"{list(defaults)}")
        if key == "name":
            name = raw
            continue
        value = _value(raw)
        if isinstance(defaults[key], float) and type(value) is int:  # rope_theta=500000 is a float field
            value = float(value)
        overrides[key] = value
    if name is None:
        raise ValueError(f"{source} is a state dict without a config: give the model settings after OUT_DIR, "
                         "e.g. the key=value line from-hf printed (model.name=... model.dim=...)")
    return name, overrides


# ---------------------------------------------------------------------------------------
# Reading a HF folder

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return out


def read_safetensors(hf_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(HF name -> tensor, HF name -> the file holding it) of a folder's safetensors."""
    st = _safetensors_torch()
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files, weight_map = [os.path.join(hf_dir, "model.safetensors")], None
    elif os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map (tensor name -> file)")
        files = [os.path.join(hf_dir, f) for f in sorted(set(weight_map.values()))]
    else:
        files, weight_map = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))), None
    if not files:
        raise ValueError(f"{hf_dir} has no *.safetensors files (a PyTorch .bin checkpoint? load it in transformers "
                         "and save_pretrained(..., safe_serialization=True))")
    tensors, where = {}, {}
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"{index} names {os.path.basename(file)}, which is not in {hf_dir}: a shard is missing")
        for name, t in st.load_file(file).items():
            if name in where:
                raise ValueError(f"{name} is in both {where[name]} and {file}")
            tensors[name], where[name] = t, file
    for name, file in (weight_map or {}).items():
        if name not in tensors:
            raise ValueError(f"{index} says {name} is in {file}, but that file has no such tensor")
    return tensors, where


def from_hf(hf_dir: str) -> tuple[dict[str, torch.Tensor], str, dict, list[str]]:
    """A HF Llama folder -> (state dict with Meta names and Meta's q/k row order, preset
    name, ModelArgs overrides, notes for the user)."""
    if not os.path.isdir(hf_dir):
        raise ValueError(f"{hf_dir} is not a folder; give the Hugging Face model folder (config.json, *.safetensors)")
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} not found: a Hugging Face model folder has config.json next to its "
                         "*.safetensors (download the whole repository, not only the weights)")
    cfg = _read_json(config_path)
    name, overrides = model_settings(cfg, config_path)
    args = llama.model_args(name, **overrides)
    shapes = expected_shapes(args)
    tensors, where = read_safetensors(hf_dir)
    tied, notes = bool(cfg.get("tie_word_embeddings", False)), []
    state = {}
    for key, t in tensors.items():
        meta = meta_name(key)
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old exports kept; llama.py computes it from rope_theta
        if tied and key == "lm_head.weight":
            continue  # tied: it is the embedding (the copy is made below)
        if meta is None or meta not in shapes:
            raise ValueError(f"{where[key]}: tensor {key} is not a parameter of the Llama config.json describes "
                             f"({args.n_layers} layers, no biases): not a plain LlamaForCausalLM checkpoint")
        if tuple(t.shape) != shapes[meta]:
            raise ValueError(f"{where[key]}: {key} has shape {tuple(t.shape)}, but config.json implies "
                             f"{shapes[meta]} (llama.py's {meta}); the weights and config.json disagree")
        heads = _heads(meta, args)
        state[meta] = hf_to_meta_rows(t, heads) if heads else t
    if tied and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
        notes.append("untied embeddings: config.json has tie_word_embeddings=true; output.weight is a copy of "
                     "tok_embeddings.weight (llama.py has no tying: from here on they train separately)")
    missing = [n for n in shapes if n not in state]
    if missing:
        raise ValueError(f"{hf_dir}: no tensor {hf_name(missing[0])} (llama.py's {missing[0]}) in its safetensors"
                         f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}; the checkpoint "
                         "is incomplete or not a Llama of this config")
    return {n: state[n] for n in shapes}, name, overrides, notes


# ---------------------------------------------------------------------------------------
# Writing a HF folder

def to_hf(state: dict[str, torch.Tensor], name: str, overrides: dict, out_dir: str, source: str = "the checkpoint",
          max_shard_bytes: int = SHARD_BYTES, dtype: torch.dtype | None = None) -> list[str]:
    """Write a LlamaForCausalLM folder (config.json, safetensors shards and their index)
    for a state dict with Meta's names; returns the files written."""
    st = _safetensors_torch()
    args = llama.model_args(name, **overrides)
    shapes = expected_shapes(args)
    for meta, shape in shapes.items():
        if meta not in state:
            raise ValueError(f"{source} has no tensor {meta}: it is not the model its settings describe "
                             f"(model.name={name}, overrides {overrides})")
        if tuple(state[meta].shape) != shape:
            raise ValueError(f"{source}: {meta} has shape {tuple(state[meta].shape)}, the model settings give "
                             f"{shape}; pass the settings it was trained with")
    extra = [n for n in state if n not in shapes]
    if extra:
        raise ValueError(f"{source} has tensors the model does not: {extra[:3]}; pass the settings it was trained with")
    if os.path.exists(os.path.join(out_dir, "config.json")) or glob.glob(os.path.join(out_dir, "*.safetensors")):
        raise ValueError(f"{out_dir} already holds a model; give a new or empty folder")
    dtype = dtype or state["tok_embeddings.weight"].dtype
    hf_state = {}
    for meta in shapes:
        heads = _heads(meta, args)
        t = state[meta].to(dtype)
        hf_state[hf_name(meta)] = (meta_to_hf_rows(t, heads) if heads else t).contiguous()
    # Greedy in model order, as transformers' save_pretrained: a new shard when the next
    # tensor would overflow this one.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key], size = t, size + nbytes
    os.makedirs(out_dir, exist_ok=True)
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})  # transformers checks "pt"
        weight_map.update({key: file for key in shard})
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    for file, obj in ((INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}),
                      ("config.json", hf_config(args, dtype))):
        with open(os.path.join(out_dir, file), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        files.append(file)
    return files
