"""Hugging Face checkpoints in and out (hf.py, `checkpoint.py from-hf / to-hf`) and HF
tokenizer.json (data.py), offline and on tiny models.

  * a HF folder written here (HF names, HF's permuted q/k rows, sharded or not) converts
    to Meta's tensors bitwise, and back to the same HF tensors and config.json fields;
  * train.py started from the converted weights (checkpoint.initial) has the step-1 loss
    of a plain forward of them; its checkpoint exports to HF and reads back bitwise;
  * a model llama.py cannot hold is refused naming the key; tied embeddings are untied;
  * the command line reports errors as `error: ...`, exit 2;
  * with transformers installed: a LlamaForCausalLM saved by transformers gives our
    model's logits, and our export loads in from_pretrained with the same logits;
  * a tokenizer.json made from the builtin ranks gives the ranks file's ids.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import config
import data
import hf
import llama
import parallelize
import train
from distributed import train_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
safetensors_torch = pytest.importorskip("safetensors.torch", reason="hf.py reads and writes safetensors")

# The tiny model of test_train.TINY as a HF config.json (intermediate 192 = the debug
# preset's FFN rule at dim 64; vocab 4096 = the builtin tokenizer).
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "vocab_size": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
          "max_position_embeddings": 4096, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 3840, "eos_token_id": 3841}
# HF's names, written out here rather than taken from hf.py.
HF_LAYER = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
            "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}


def to_hf_name(name: str) -> str:
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER[rest.removesuffix('.weight')]}.weight"


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py permute: Meta rows -> HF rows."""
    dim1, dim2 = w.shape
    return w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_weights(args: llama.ModelArgs, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Random Meta-layout weights; the output scaled up so the loss is far from the
    random init's (which would hide a checkpoint.initial that was not loaded)."""
    model = llama.build_model(args, "cpu")
    llama.init_weights(model, args, seed)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state["output.weight"] *= 4
    return state


def hf_tensors(state: dict[str, torch.Tensor], args: llama.ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        heads = args.n_heads if ".wq." in name else args.kv_heads if ".wk." in name else None
        out[to_hf_name(name)] = permute(t, heads).contiguous() if heads else t
    return out


def write_hf(folder, cfg: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> str:
    """A HF model folder: config.json and model.safetensors, or `shards` files and the index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if shards == 1:
        safetensors_torch.save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return str(folder)
    names, weight_map = list(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        safetensors_torch.save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(folder, hf.INDEX), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return str(folder)


def read_hf_folder(folder) -> dict[str, torch.Tensor]:
    index = json.load(open(os.path.join(folder, hf.INDEX)))
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(safetensors_torch.load_file(os.path.join(folder, file)))
    assert sorted(out) == sorted(index["weight_map"])
    return out


def tiny_args() -> llama.ModelArgs:
    name, overrides = hf.model_settings(CONFIG, "config.json")
    return llama.model_args(name, **overrides)


def from_hf_cli(hf_dir: str, out: str, capsys) -> tuple[str, str]:
    """checkpoint.py from-hf in this process: (its output, the printed key=value line)."""
    checkpoint.main(["from-hf", hf_dir, out])
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("or as overrides: "))
    return printed, line.removeprefix("or as overrides: ")


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ---------------------------------------------------------------------------------------
# Round trip, and training from the converted weights


@pytest.mark.parametrize("shards", [1, 3])
def test_from_hf_then_to_hf_is_bitwise(tmp_path, capsys, shards):
    args = tiny_args()
    meta = meta_weights(args)
    hf_dir = write_hf(tmp_path / "hf", CONFIG, hf_tensors(meta, args), shards)
    printed, overrides = from_hf_cli(hf_dir, str(tmp_path / "w.pt"), capsys)
    assert "model:\n  name: debug\n" in printed and "checkpoint.initial=" in printed
    # Meta's tensors exactly: HF's permutation undone (checked against transformers' own formula).
    assert_bitwise(torch.load(tmp_path / "w.pt", weights_only=True), meta)
    checkpoint.main(["to-hf", str(tmp_path / "w.pt"), str(tmp_path / "out"), *overrides.split(),
                     "--max-shard-gb", "0.0003"])  # 300 kB: the 1 MB embedding alone, the rest in several
    exported = read_hf_folder(tmp_path / "out")
    assert_bitwise(exported, hf_tensors(meta, args))
    index = json.load(open(tmp_path / "out" / hf.INDEX))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in meta.values())
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert {k: written.get(k) for k in CONFIG} == CONFIG


def test_training_starts_from_the_hf_weights_and_exports_back(tmp_path, capsys):
    """Step 1's loss (train.py, checkpoint.initial = the converted file) equals a plain
    forward of the same weights on the first batch; the step-1 checkpoint exports to a HF
    folder whose tensors read back to the checkpoint's, bitwise."""
    args = tiny_args()
    meta = meta_weights(args)
    hf_dir = write_hf(tmp_path / "hf", CONFIG, hf_tensors(meta, args))
    _, overrides = from_hf_cli(hf_dir, str(tmp_path / "w.pt"), capsys)
    argv = train_argv(str(tmp_path / "run"), "training.steps=1", "checkpoint.interval=1",
                      f"checkpoint.initial={tmp_path / 'w.pt'}", *overrides.split())
    first = train.main(argv)[0]["loss"]

    cli = train.parse_args(argv)
    cfg = config.load_config(cli.config, cli.overrides)
    plan = config.validate(cfg, 1)
    assert plan.model_args == args
    loader, _ = train.build_data(cfg, plan, parallelize.rank_coords(plan.degrees, 0))
    inputs, labels = next(loader)
    model = llama.Transformer(args)
    model.load_state_dict(meta)
    with torch.no_grad():
        want = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).item()
    assert first == pytest.approx(want, rel=2e-6), (first, want)
    assert abs(first - (torch.log(torch.tensor(4096.0)).item() + 0.5)) > 1.0  # not the random init's loss

    step = str(tmp_path / "run" / "checkpoints" / "step-1")
    checkpoint.main(["to-hf", step, str(tmp_path / "out")])
    state, name, got_overrides, notes = hf.from_hf(str(tmp_path / "out"))
    assert_bitwise(state, checkpoint.consolidate(step))
    assert llama.model_args(name, **got_overrides) == args and notes == []


# ---------------------------------------------------------------------------------------
# Refusals, tied embeddings, the command line


def test_a_model_that_does_not_fit_is_refused(tmp_path):
    args = tiny_args()
    good = hf_tensors(meta_weights(args), args)
    cases = [  # (config changes, tensor changes, words the error must contain)
        ({"intermediate_size": 100}, {}, ["intermediate_size=100", "hidden_size=64"]),
        ({"head_dim": 32}, {}, ["head_dim=32"]),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, {}, ["mistral", "LlamaForCausalLM"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {}, ["'yarn'"]),
        ({"attention_bias": True}, {}, ["attention_bias=True"]),
        ({}, {"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)},
         ["model.layers.1.self_attn.k_proj.weight", "(64, 64)", "(32, 64)"]),
        ({}, {"model.layers.0.mlp.up_proj.weight": None}, ["model.layers.0.mlp.up_proj.weight", "incomplete"]),
        ({}, {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, ["model.layers.0.self_attn.q_proj.bias"]),
        ({"num_hidden_layers": 1}, {}, ["model.layers.1."]),  # a layer config.json does not have
    ]
    for i, (cfg_change, tensor_change, words) in enumerate(cases):
        tensors = {**good, **tensor_change}
        tensors = {k: v for k, v in tensors.items() if v is not None}
        folder = write_hf(tmp_path / str(i), {**CONFIG, **cfg_change}, tensors)
        with pytest.raises(ValueError) as e:
            hf.from_hf(folder)
        for word in words:
            assert word in str(e.value), (cfg_change, list(tensor_change), str(e.value))
    with pytest.raises(ValueError, match="not a folder"):
        hf.from_hf(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="config.json not found"):
        hf.from_hf(str(tmp_path / "empty"))
    state = hf.from_hf(write_hf(tmp_path / "ok", CONFIG, good))[0]
    with pytest.raises(ValueError, match=r"layers.0.attention.wk.weight has shape \(32, 64\), .* \(64, 64\)"):
        hf.to_hf(state, "debug", {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4}, str(tmp_path / "x"))


def test_ffn_settings_cover_the_llama3_releases():
    """intermediate_size of Llama 3.2 1B / 3B, 3.1 8B / 70B / 405B: llama.py's rule gives it."""
    for dim, ffn in ((2048, 8192), (3072, 8192), (4096, 14336), (8192, 28672), (16384, 53248)):
        for s in hf._ffn_settings(dim, ffn, "config.json"):
            assert llama.ModelArgs(dim=dim, **s).ffn_dim == ffn
    cfg = {**CONFIG, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
           "rope_theta": 500000.0, "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    assert hf.model_settings(cfg, "config.json") == ("llama3_8b", {})  # Llama 3.1 8B is the preset
    cfg.update(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True)
    cfg["rope_scaling"] = {**cfg["rope_scaling"], "factor": 32.0}
    assert hf.model_settings(cfg, "config.json") == ("llama3_1b", {})  # Llama 3.2 1B (untied on import)


def test_tied_embeddings_are_untied(tmp_path, capsys):
    args = tiny_args()
    tensors = hf_tensors(meta_weights(args), args)
    del tensors["lm_head.weight"]
    folder = write_hf(tmp_path / "hf", {**CONFIG, "tie_word_embeddings": True}, tensors)
    printed, _ = from_hf_cli(folder, str(tmp_path / "w.pt"), capsys)
    assert "untied embeddings" in printed and "tie_word_embeddings=true" in printed
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert state["output.weight"].data_ptr() != state["tok_embeddings.weight"].data_ptr()


def test_command_line(tmp_path):
    args = tiny_args()
    folder = write_hf(tmp_path / "hf", CONFIG, hf_tensors(meta_weights(args), args))
    ok = subprocess.run([sys.executable, "checkpoint.py", "from-hf", folder, str(tmp_path / "w.pt")],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"checkpoint.initial={tmp_path / 'w.pt'}" in ok.stdout and "model.name=debug" in ok.stdout
    bad = subprocess.run([sys.executable, "checkpoint.py", "from-hf", str(tmp_path / "nowhere"), "x.pt"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nowhere" in bad.stderr, bad.stderr
    assert len(bad.stderr.splitlines()) == 1  # no traceback


def test_without_safetensors_the_error_names_the_install(tmp_path, capsys, monkeypatch):
    args = tiny_args()
    folder = write_hf(tmp_path / "hf", CONFIG, hf_tensors(meta_weights(args), args))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors.torch` raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["from-hf", folder, str(tmp_path / "w.pt")])
    assert e.value.code == 2 and "error: " in (err := capsys.readouterr().err) and "pip install safetensors" in err


@pytest.mark.parametrize("argv, words", [
    (["from-hf", "{tmp}", "{tmp}/w.pt"], ["config.json not found"]),
    (["to-hf", "{tmp}/w.pt", "{tmp}/out"], ["w.pt not found"]),
    (["to-hf", "{pt}", "{tmp}/out"], ["without a config", "model.name="]),
    (["to-hf", "{pt}", "{tmp}/out", "model.name=debug", "model.dimm=64"], ["model.dimm=64", "FIELD"]),
    (["to-hf", "{pt}", "{tmp}/out", "model.name=debug"], ["tok_embeddings.weight has shape (4096, 64)",
                                                           "(4096, 256)"]),
    (["to-hf", "{tmp}", "{tmp}/out"], ["not a committed checkpoint"]),
])
def test_command_line_errors(tmp_path, capsys, argv, words):
    pt = tmp_path / "given.pt"
    torch.save(meta_weights(tiny_args()), pt)
    with pytest.raises(SystemExit) as e:
        checkpoint.main([a.format(tmp=tmp_path, pt=pt) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: "), err
    for word in words:
        assert word in err, err


# ---------------------------------------------------------------------------------------
# Against transformers' own LlamaForCausalLM


@pytest.mark.parametrize("variant", ["plain", "rope_scaling", "tied"])
def test_logits_match_transformers(tmp_path, variant):
    transformers = pytest.importorskip("transformers", reason="the comparison with HF's model needs transformers")
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}  # bands at wavelengths 4..16: the 8 pairs span all three
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=256,
        rope_scaling=rope if variant == "rope_scaling" else None, tie_word_embeddings=variant == "tied")
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # larger than HF's 0.02 init: sharp attention, so a wrong row order shows
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    ref.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits

    state, name, overrides, notes = hf.from_hf(str(tmp_path / "hf"))
    assert (notes != []) == (variant == "tied")
    args = llama.model_args(name, **overrides)
    ours = llama.Transformer(args).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        got = ours(tokens)
    # float32: ~1e-7 relative per operation over a few hundred-term sums and 2 layers.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    if variant == "rope_scaling":  # the scaling matters here: without it the logits differ
        plain = llama.Transformer(llama.model_args(name, **{**overrides, "rope_scaling": False})).eval()
        plain.load_state_dict(state)
        with torch.no_grad():
            assert (plain(tokens) - want).abs().max() > 100 * 1e-5 * scale

    hf.to_hf(state, name, overrides, str(tmp_path / "out"), max_shard_bytes=200_000)
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(tokens).logits
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------
# tokenizer.json

TEXT = ("Hello, world! héllo naïve café — Ångström 日本語のテキスト 한국어 emoji 🚀👩‍👩‍👧 flags 🇫🇷\n"
        "tabs\t\tand   runs  \u00a0\u2003 of spaces\r\n\n  numbers 1234567 3.14159 ½ ² Ⅻ 0xDEADBEEF\n"
        "def f(x: int) -> int:\n    return x ** 2  # it's we'll I'M\n"
        "combining e\u0301 zero width\u200bjoiner RTL עברית العربية ")
SPECIALS_AS_TEXT = " <|begin_of_text|> <|end_of_text|> <|eot_id|> are just text here"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, written out as transformers has it."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level(b: bytes) -> str:
    return "".join(bytes_to_unicode()[x] for x in b)


def tokenizer_json(ranks: dict[bytes, int], specials: list[str]) -> dict:
    """A Llama 3 style tokenizer.json (as transformers' TikTokenConverter writes it)."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(((a, b, rank) for a, b in pairs), key=lambda m: (ranks[m[0]], ranks[m[1]]))
    merges.sort(key=lambda m: m[2])
    n = len(ranks)
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(specials)],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": data.PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {byte_level(t): r for t, r in ranks.items()},
                  "merges": [[byte_level(a), byte_level(b)] for a, b, _ in merges]},
    }


@pytest.fixture(scope="module")
def builtin_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    spec = tokenizer_json(data.read_ranks(str(data.BUILTIN_TOKENIZER)), data.SPECIAL_TOKENS)
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_tokenizer_json_gives_the_ranks_file_ids(builtin_json):
    ref, tok = data.load_tokenizer("builtin"), data.load_tokenizer(builtin_json)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.special_tokens) == (
        ref.n_words, ref.bos_id, ref.eos_id, ref.special_tokens)
    ids = tok.encode(TEXT + SPECIALS_AS_TEXT, bos=True, eos=True)
    assert ids == ref.encode(TEXT + SPECIALS_AS_TEXT, bos=True, eos=True)
    assert len(ids) < len((TEXT + SPECIALS_AS_TEXT).encode()) * 0.8  # merges happened, not bytes only
    assert tok.decode(ids[1:-1]) == TEXT + SPECIALS_AS_TEXT


def test_the_tokenizers_library_reads_our_tokenizer_json_alike(builtin_json):
    """The fixture is a real tokenizer.json: HF's tokenizers gives the same ids."""
    tokenizers = pytest.importorskip("tokenizers", reason="checking the fixture with HF's reader needs tokenizers")
    theirs = tokenizers.Tokenizer.from_file(builtin_json)
    assert theirs.encode(TEXT, add_special_tokens=False).ids == data.load_tokenizer("builtin").encode(TEXT)


def test_tokenizer_json_refusals(tmp_path, builtin_json):
    spec = json.loads(open(builtin_json, encoding="utf-8").read())
    bad = {  # name -> (the change, words the error must contain)
        "unigram": ({"model": {"type": "Unigram", "vocab": []}}, ["'Unigram'"]),
        "regex": ({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, ["PAT_STR"]),
        "normalizer": ({"normalizer": {"type": "NFC"}}, ["normalizer"]),
        "specials": ({"added_tokens": spec["added_tokens"][1:]}, ["<|begin_of_text|>"]),
    }
    for name, (change, words) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**spec, **change}))
        with pytest.raises(ValueError) as e:
            data.load_tokenizer(str(path))
        for word in [str(path), *words]:
            assert word in str(e.value), (name, str(e.value))
    # Llama 3.0 names some specials otherwise (128004 is <|reserved_special_token_2|>):
    # accepted, with the file's names.
    renamed = [dict(t) for t in spec["added_tokens"]]
    renamed[4]["content"] = "<|reserved_special_token_2|>"
    renamed[11]["content"] = "<|finetune_right_pad_id|>"
    path = tmp_path / "llama30.json"
    path.write_text(json.dumps({**spec, "added_tokens": renamed}))
    tok = data.load_tokenizer(str(path))
    base = tok.bos_id
    assert tok.special_tokens["<|reserved_special_token_2|>"] == base + 4 and tok.eos_id == base + 1
