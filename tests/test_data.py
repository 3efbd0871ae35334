"""data.py: tokenizer against hand-computed BPE, loader layout against the dp=1 loader,
exact resume, prepare round trips against direct encoding, and every bad-input error."""

import base64
import functools
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data

BYTES = [bytes([b]) for b in range(256)]
UNICODE_TEXTS = [
    "",
    "Hello, world!",
    "héllo naïve café — Ångström, Æsir, Øre, façade",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🚀🔥👩‍👩‍👧‍👦 flags 🇫🇷 and skin 👍🏽",
    "tabs\t\tand   runs      of spaces\n\n\n\r\n  \u00a0\u2003 trailing   ",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A(object):\n\tpass\n",
    "combining e\u0301 vs \u00e9, zero width\u200bjoiner, RTL עברית العربية",
    "numbers 1234567 3.14159 1e-10 0xDEADBEEF ½ ² Ⅻ",
    "<|begin_of_text|> <|end_of_text|> <|eot_id|> are just text here",
]


split_regex = functools.cache(data._stdlib_split_regex)  # ~1 s to build: once per session


def write_ranks(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def tok() -> data.Tokenizer:
    return data.load_tokenizer("builtin")


# ----------------------------------------------------------------------------- tokenizer

def test_special_tokens_follow_meta_llama3_order():
    names = data.SPECIAL_TOKENS
    assert len(names) == 256 and len(set(names)) == 256
    # Meta's Llama 3.1 ids minus the 128000 base ranks.
    meta = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
            "<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4, "<|step_id|>": 5,
            "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
            "<|python_tag|>": 10, "<|reserved_special_token_2|>": 11, "<|reserved_special_token_246|>": 255}
    for name, offset in meta.items():
        assert names.index(name) == offset, name


def test_builtin_tokenizer_ids(tok):
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (4096, 3840, 3841)
    assert tok.special_tokens["<|eot_id|>"] == 3849
    assert tok.model.n_vocab == 4096
    assert len(tok.sha256) == 64


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 3840 for i in ids), "ordinary text must never encode to a special id"
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + ids + [tok.eos_id]


def test_llama3_split_regex_in_stdlib_re_matches_regex_module():
    regex = pytest.importorskip("regex")  # installed with tiktoken; data.py itself does not use it
    ours, ref = split_regex(), regex.compile(data.PAT_STR)
    for text in UNICODE_TEXTS + ["I'm   you'LL they've\n\n  x", "a" * 50 + "1" * 7 + "!!!\r\n"]:
        assert ours.findall(text) == ref.findall(text), text


def naive_bpe_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Reference: per regex chunk, repeatedly merge the adjacent pair of lowest rank."""
    out = []
    for chunk in split_regex().findall(text):
        parts = [bytes([b]) for b in chunk.encode()]
        while True:
            cands = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not cands:
                break
            _, i = min(cands)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def test_builtin_encoding_matches_naive_bpe(tok):
    ranks = data.read_ranks(tok.path)
    for text in UNICODE_TEXTS:
        assert tok.encode(text) == naive_bpe_encode(text, ranks), text


def test_handmade_ranks_file(tmp_path):
    path = write_ranks(tmp_path / "tiny.tiktoken", BYTES + [b"ab", b"abc", b" a"])
    t = data.Tokenizer(str(path))
    assert (t.n_words, t.bos_id, t.eos_id, t.special_tokens["<|eot_id|>"]) == (515, 259, 260, 268)
    # "abc" -> ab (256) -> abc (257); " abc": "ab" (256) beats " a" (258), then "abc".
    assert t.encode("abc abc") == [257, 32, 257]
    assert t.encode("ba", eos=True) == [98, 97, 260]
    assert t.decode([257, 32, 257]) == "abc abc"


def test_llama3_sized_ranks_file_gives_meta_ids(tmp_path):
    filler = [b"tok%d" % i for i in range(128000 - 256)]
    t = data.Tokenizer(str(write_ranks(tmp_path / "tokenizer.model", BYTES + filler)))
    assert (t.n_words, t.bos_id, t.eos_id) == (128256, 128000, 128001)
    st = t.special_tokens
    assert (st["<|finetune_right_pad_id|>"], st["<|start_header_id|>"], st["<|end_header_id|>"],
            st["<|eom_id|>"], st["<|eot_id|>"], st["<|python_tag|>"]) == (128004, 128006, 128007, 128008, 128009, 128010)
    assert st["<|reserved_special_token_246|>"] == 128255


GOOD = "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(BYTES))


@pytest.mark.parametrize("content, needle", [
    ("", "empty"),
    ("\n\n", "empty"),
    ("!!notbase64 0\n", ":1: invalid base64"),
    ("QQ== zero\n", ":1: rank 'zero'"),
    ("QQ==\n", ":1: expected"),
    (GOOD + "YWI= 257\n", ":257: rank 257, expected 256"),
    (GOOD + "QQ== 256\n", ":257: token b'A' appears twice"),
    ("".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(BYTES[:10])), "256 single bytes"),
])
def test_bad_ranks_file(tmp_path, content, needle):
    path = tmp_path / "bad.model"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.model") as err:
        data.Tokenizer(str(path))
    assert needle in str(err.value)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data.load_tokenizer(str(tmp_path / "nope.model"))


def naive_bpe_train(texts: list[str], vocab_size: int) -> list[bytes]:
    """Reference trainer: recount every pair before every merge; ties -> smallest ids."""
    words = [list(c.encode()) for t in texts for c in split_regex().findall(t)]
    vocab = list(BYTES)
    while len(vocab) < vocab_size:
        counts = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        (a, b) = min(counts, key=lambda p: (-counts[p], p))
        merged = vocab[a] + vocab[b]
        if merged not in vocab:
            vocab.append(merged)
        new = vocab.index(merged)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [new]
                i += 1
    return vocab


def test_train_bpe_matches_naive_trainer(tmp_path):
    texts = UNICODE_TEXTS + ["the cat sat on the mat; the hat, the bat " * 3, "aaaa bbbb aaaa abab"]
    ours = data.train_bpe(texts, 330)
    assert ours == naive_bpe_train(texts, 330)
    assert data.train_bpe(texts, 330) == ours  # deterministic
    data.write_ranks(ours, str(tmp_path / "t.tiktoken"))
    t = data.Tokenizer(str(tmp_path / "t.tiktoken"))
    assert t.n_words == 330 + 256
    for text in UNICODE_TEXTS:
        assert t.decode(t.encode(text)) == text


# ----------------------------------------------------------------------------- loader

L = 7  # seq_len; windows are 8 tokens; window i holds tokens 8i..8i+7 of an arange stream


def arange_dataset(n_windows: int = 100, extra: int = 5) -> data.TokenDataset:
    return data.TokenDataset("arange", [np.arange(n_windows * (L + 1) + extra, dtype=np.uint32)], L)


def take(loader: data.DataLoader, n: int) -> list[torch.Tensor]:
    """Window ids of the next n micro batches."""
    return [next(loader)[0][:, 0] // (L + 1) for _ in range(n)]


def global_batches(ds, steps: int, G: int, mb: int, dp: int, seed: int = 0, state=None) -> list[list[int]]:
    """Reassemble each global batch in position order from all ranks' micro batches."""
    loaders = [data.DataLoader(ds, L, G, mb, r, dp, seed) for r in range(dp)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    accum, out = G // (mb * dp), []
    for _ in range(steps):
        pos = [None] * G
        for k in range(accum):
            for r, loader in enumerate(loaders):
                pos[(k * dp + r) * mb:(k * dp + r + 1) * mb] = take(loader, 1)[0].tolist()
        out.append(pos)
    return out


def test_inputs_labels_shift_and_dtype():
    x, y = next(data.DataLoader(arange_dataset(), L, 4, 2, 0, 1, seed=0))
    assert x.shape == y.shape == (2, L) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(L)) and bool((x[:, 0] % (L + 1) == 0).all())


def test_same_seed_same_batches_different_seed_different():
    ds = arange_dataset()
    a = take(data.DataLoader(ds, L, 8, 4, 0, 1, seed=1), 10)
    b = take(data.DataLoader(ds, L, 8, 4, 0, 1, seed=1), 10)
    c = take(data.DataLoader(ds, L, 8, 4, 0, 1, seed=2), 10)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_ranks_and_micro_steps_tile_the_global_batch():
    ds, G = arange_dataset(), 12
    reference = take(data.DataLoader(ds, L, G, G, 0, 1, seed=3), 8)  # dp 1, one micro batch = global batch
    dp, mb = 3, 2
    loaders = [data.DataLoader(ds, L, G, mb, r, dp, seed=3) for r in range(dp)]
    for step in range(8):
        for k in range(G // (mb * dp)):
            for r, loader in enumerate(loaders):
                got = take(loader, 1)[0]
                first = (k * dp + r) * mb
                assert torch.equal(got, reference[step][first:first + mb]), (step, k, r)
    # one epoch = 100 // 12 = 8 steps of distinct windows
    seen = torch.cat(reference).tolist()
    assert len(set(seen)) == len(seen) == 96


def test_union_over_ranks_is_the_global_batch_disjointly():
    ds = arange_dataset()
    for pos in global_batches(ds, 10, G=8, mb=2, dp=2, seed=5):
        assert None not in pos and len(set(pos)) == 8


def test_global_stream_independent_of_dp_size():
    ds = arange_dataset()
    ref = global_batches(ds, 20, G=8, mb=8, dp=1, seed=7)  # crosses two epochs (12 steps each)
    assert global_batches(ds, 20, G=8, mb=4, dp=2, seed=7) == ref
    assert global_batches(ds, 20, G=8, mb=1, dp=4, seed=7) == ref
    assert global_batches(ds, 20, G=8, mb=2, dp=1, seed=7) == ref
    assert sorted(ref[12] + ref[13]) != sorted(ref[0] + ref[1])  # epoch 1 redraws the order


@pytest.mark.parametrize("k", [3, 11, 12, 13, 30])  # 12 steps per epoch: before, at, after the boundary
def test_exact_resume(k):
    ds = arange_dataset()
    full = data.DataLoader(ds, L, 8, 2, 1, 2, seed=11)
    ref = take(full, 2 * (k + 10))
    first = data.DataLoader(ds, L, 8, 2, 1, 2, seed=11)
    take(first, 2 * k)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = data.DataLoader(ds, L, 8, 2, 1, 2, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(take(resumed, 20), ref[2 * k:]))


def test_resume_mid_accumulation():
    ds = arange_dataset()
    ref = take(data.DataLoader(ds, L, 8, 2, 0, 2, seed=0), 9)
    first = data.DataLoader(ds, L, 8, 2, 0, 2, seed=0)
    take(first, 5)
    assert first.state_dict()["micro_step"] == 1
    resumed = data.DataLoader(ds, L, 8, 2, 0, 2, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(take(resumed, 4), ref[5:]))
    other = data.DataLoader(ds, L, 8, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size is 2 in the checkpoint but 4"):
        other.load_state_dict(first.state_dict())


def test_resume_with_another_dp_size():
    ds = arange_dataset()
    ref = global_batches(ds, 10, G=8, mb=2, dp=4, seed=9)
    loaders = [data.DataLoader(ds, L, 8, 2, r, 4, seed=9) for r in range(4)]
    for loader in loaders:
        take(loader, 4)  # 4 steps at accum 1
    state = loaders[0].state_dict()
    assert global_batches(ds, 6, G=8, mb=2, dp=2, seed=9, state=state) == ref[4:]


@pytest.mark.parametrize("key, kwargs", [("seed", {"seed": 1}), ("global_batch_size", {"G": 16})])
def test_resume_mismatch(key, kwargs):
    ds = arange_dataset()
    state = data.DataLoader(ds, L, 8, 2, 0, 1, seed=0).state_dict()
    other = data.DataLoader(ds, L, kwargs.get("G", 8), 2, 0, 1, seed=kwargs.get("seed", 0))
    with pytest.raises(ValueError, match=f"{key} is"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="n_windows is 100 in the checkpoint but 50"):
        data.DataLoader(arange_dataset(50), L, 8, 2, 0, 1, seed=0).load_state_dict(state)


def test_loader_config_errors():
    ds = arange_dataset()
    with pytest.raises(ValueError, match="batch_size 10 .*micro_batch_size 2 x data-parallel degree 3"):
        data.DataLoader(ds, L, 10, 2, 0, 3, seed=0)
    with pytest.raises(ValueError, match=r"dataset arange has 805 tokens.*needs 1,024 \(batch_size 128"):
        data.DataLoader(ds, L, 128, 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="seq_len 8 != dataset arange seq_len 7"):
        data.DataLoader(ds, 8, 8, 2, 0, 1, seed=0)


def test_windows_across_shards_and_ranges():
    stream = np.arange(1000, dtype=np.uint32)
    cuts = [0, 3, 130, 131, 600, 1000]
    sharded = data.TokenDataset("s", [stream[a:b] for a, b in zip(cuts, cuts[1:])], L, start=17, stop=950)
    assert len(sharded) == (950 - 17) // 8 and sharded.max_id == 999
    for i in range(len(sharded)):
        assert np.array_equal(sharded[i], np.arange(17 + 8 * i, 17 + 8 * i + 8))
    with pytest.raises(IndexError):
        sharded[len(sharded)]


# ----------------------------------------------------------------------------- files

DOCS_TXT = ["First document: héllo 🚀\nwith two lines\n", "Second, 日本語 text\n\n\tindented"]
DOCS_JSONL = ["json doc one", "json doc two with <|eot_id|> inside", "three\nlines\nhere"]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """tmp_path/src with a.txt, b.txt, c.jsonl; returns (dir, documents in sorted-file order)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(DOCS_TXT[0], encoding="utf-8")
    (src / "b.txt").write_text(DOCS_TXT[1], encoding="utf-8")
    (src / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS_JSONL)) + "\n\n")
    return src, DOCS_TXT + DOCS_JSONL


def reference_stream(tok, docs) -> list[int]:
    return [t for d in docs for t in tok.encode(d, eos=True)]


def split_tokens(ds: data.TokenDataset) -> list[int]:
    return ds.tokens(0, ds.n_tokens).tolist()


def test_prepare_round_trip(tok, corpus, tmp_path):
    src, docs = corpus
    ref = reference_stream(tok, docs)
    shards = data.prepare([str(src / "*.txt"), str(src / "c.jsonl")], str(tmp_path / "out"), tok, 16, 2)
    assert len(shards) == -(-len(ref) // 16)
    got = []
    for i, path in enumerate(shards):
        meta = json.loads(Path(path + ".json").read_text())
        tokens = np.fromfile(path, dtype="<u4")
        assert meta["n_tokens"] == tokens.size == (16 if i < len(shards) - 1 else len(ref) - 16 * i)
        assert (meta["tokenizer_sha256"], meta["n_words"], meta["dtype"]) == (tok.sha256, 4096, "uint32")
        got += tokens.tolist()
    assert got == ref
    cut = len(ref) - len(ref) // 20
    for split, expect in (("train", ref[:cut]), ("val", ref[cut:])):
        from_bin = data.load_dataset(str(tmp_path / "out"), tok, split, 3, str(tmp_path / "cache"))
        from_text = data.load_dataset(str(src / "*"), tok, split, 3, str(tmp_path / "cache"))
        assert split_tokens(from_bin) == split_tokens(from_text) == expect
        assert isinstance(from_bin.shards[0], np.memmap)


def test_prepare_cli(corpus, tmp_path):
    src, docs = corpus
    out = tmp_path / "cli"
    cmd = [sys.executable, str(Path(data.__file__)), "prepare", str(src / "c.jsonl"), "--out", str(out),
           "--shard-tokens", "1000", "--workers", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tok = data.load_tokenizer("builtin")
    assert np.fromfile(out / "shard-00000.bin", dtype="<u4").tolist() == reference_stream(tok, DOCS_JSONL)


def test_text_cache_reused_and_invalidated(tok, corpus, tmp_path, capsys):
    src, docs = corpus
    cache = str(tmp_path / "cache")
    first = split_tokens(data.load_dataset(str(src), tok, "train", 3, cache))
    second = split_tokens(data.load_dataset(str(src), tok, "train", 3, cache))
    assert first == second and capsys.readouterr().out.count("data: tokenized") == 1
    (src / "b.txt").write_text("changed content, longer than before", encoding="utf-8")
    changed = data.load_dataset(str(src), tok, "train", 3, cache)
    assert capsys.readouterr().out.count("data: tokenized") == 1
    new_docs = [DOCS_TXT[0], "changed content, longer than before"] + DOCS_JSONL
    ref = reference_stream(tok, new_docs)
    assert split_tokens(changed) == ref[:len(ref) - len(ref) // 20]


def _load_in_child(args: tuple[str, str]) -> list[int]:
    spec, cache = args
    return split_tokens(data.load_dataset(spec, data.load_tokenizer("builtin"), "train", 3, cache))


def test_cache_build_race_is_safe(tok, corpus, tmp_path):
    src, docs = corpus
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_load_in_child, [(str(src), cache)] * 8)
    assert all(r == results[0] for r in results)
    assert sorted(p.suffix for p in Path(cache).iterdir()) == [".bin", ".json"]  # no temp files left


def test_builtin_dataset(tok, tmp_path_factory, capsys):
    cache = str(tmp_path_factory.mktemp("cache"))
    root, train_files = data.builtin_files("train")
    _, val_files = data.builtin_files("val")
    everything = sorted(train_files + val_files)
    assert val_files == everything[19::20] and not set(train_files) & set(val_files)
    banned = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
    assert not any(set(f.split("/")) & banned for f in everything)
    train = data.load_dataset("builtin", tok, "train", 255, cache, vocab_size=4096)
    val = data.load_dataset("builtin", tok, "val", 255, cache)
    assert train.n_tokens > 1_000_000 and val.n_tokens > 20_000 and train.max_id == tok.eos_id
    first_doc = (root / train_files[0]).read_text(encoding="utf-8")
    ref = tok.encode(first_doc, eos=True)
    assert train.tokens(0, len(ref)).tolist() == ref
    capsys.readouterr()
    again = data.load_dataset("builtin", tok, "train", 255, cache)
    assert "tokenized" not in capsys.readouterr().out and again.n_tokens == train.n_tokens
    x, y = next(data.DataLoader(train, 255, 4, 2, 1, 2, seed=0))
    assert x.shape == (2, 255) and torch.equal(x[:, 1:], y[:, :-1])


# ----------------------------------------------------------------------------- bad input

def test_missing_file_and_empty_glob(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load_dataset(str(tmp_path / "missing.txt"), tok, "train", 3, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nothing\*.jsonl"):
        data.load_dataset(str(tmp_path / "nothing*.jsonl"), tok, "train", 3, str(tmp_path))


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", r"empty.txt: empty file"),
    ("blank.jsonl", b"\n\n", r"blank.jsonl: no documents"),
    ("latin1.txt", "café".encode("latin-1"), r"latin1.txt: not valid UTF-8"),
    ("latin1.jsonl", b'{"text": "ok"}\n' + '{"text": "café"}'.encode("latin-1"), r"latin1.jsonl:2: not valid UTF-8"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext.jsonl:2: no string field \"text\""),
    ("nonstr.jsonl", b'{"text": 5}\n', r"nonstr.jsonl:1: no string field"),
    ("broken.jsonl", b'{"text": "ok"}\n\n{"text": \n', r"broken.jsonl:3: invalid JSON"),
    ("table.csv", b"a,b\n", r"table.csv: unknown extension '.csv'"),
])
def test_bad_text_input(tok, tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        data.load_dataset(str(tmp_path / name), tok, "train", 3, str(tmp_path / "cache"))
    if not name.endswith(".csv"):
        with pytest.raises(ValueError, match=match):
            data.prepare([str(tmp_path / name)], str(tmp_path / "out"), tok, 100, 1)


def test_bad_bin_input(tok, corpus, tmp_path):
    src, _ = corpus
    shards = data.prepare([str(src)], str(tmp_path / "out"), tok, 10**6, 1)
    other = data.Tokenizer(str(write_ranks(tmp_path / "other.tiktoken", BYTES)))
    with pytest.raises(ValueError, match=f"shard-00000.bin was tokenized with tokenizer sha256 {tok.sha256}.*{other.sha256}"):
        data.load_dataset(str(tmp_path / "out"), other, "train", 3, str(tmp_path / "cache"))
    (tmp_path / "lonely.bin").write_bytes(np.arange(100, dtype="<u4").tobytes())
    with pytest.raises(ValueError, match="lonely.bin: sidecar .*lonely.bin.json is missing"):
        data.load_dataset(str(tmp_path / "lonely.bin"), tok, "train", 3, str(tmp_path / "cache"))
    Path(shards[0]).write_bytes(Path(shards[0]).read_bytes()[:-4])
    with pytest.raises(ValueError, match="shard-00000.bin: .* bytes but the sidecar says"):
        data.load_dataset(shards[0], tok, "train", 3, str(tmp_path / "cache"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("text")
    (mixed / "b.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes .bin and text"):
        data.load_dataset(str(mixed), tok, "train", 3, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="split 'test'"):
        data.load_dataset(str(src), tok, "test", 3, str(tmp_path / "cache"))


def test_token_ids_beyond_model_vocab(tok, corpus, tmp_path):
    src, docs = corpus
    top = max(reference_stream(tok, docs))
    assert top == tok.eos_id
    with pytest.raises(ValueError, match=f"token id {top} >= model.vocab_size 100; use a tokenizer with at most 100"):
        data.load_dataset(str(src), tok, "train", 3, str(tmp_path / "cache"), vocab_size=100)
    data.load_dataset(str(src), tok, "train", 3, str(tmp_path / "cache"), vocab_size=top + 1)
    with pytest.raises(ValueError, match="builtin.tiktoken: token id 4095 >= model.vocab_size 4000"):
        data.check_vocab(tok, 4000)
    data.check_vocab(tok, 4096)


# ----------------------------------------------------------------------------- parquet

PARQUET_DOCS = UNICODE_TEXTS + [f"def row_{i}(x):\n    return x * {i} + {i * i}  # parquet row {i}\n" for i in range(300)]


def write_parquet(path: Path, columns: dict, **kwargs) -> Path:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(dir of a.parquet (2 row groups) + b.parquet (3), dir of the same documents as
    a.jsonl + b.jsonl, the documents in order); an extra "id" column the reader skips."""
    root = tmp_path_factory.mktemp("parquet")
    (root / "pq").mkdir()
    (root / "jsonl").mkdir()
    for name, docs, rows in (("a", PARQUET_DOCS[:200], 100), ("b", PARQUET_DOCS[200:], 40)):
        write_parquet(root / "pq" / f"{name}.parquet", {"text": docs, "id": list(range(len(docs)))},
                      row_group_size=rows)
        (root / "jsonl" / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq = pytest.importorskip("pyarrow.parquet")
    assert [pq.ParquetFile(root / "pq" / f).num_row_groups for f in ("a.parquet", "b.parquet")] == [2, 3]
    return root / "pq", root / "jsonl", PARQUET_DOCS


def test_parquet_stream_equals_jsonl(tok, parquet_corpus, tmp_path):
    pq_dir, jsonl_dir, docs = parquet_corpus
    ref = reference_stream(tok, docs)
    cut = len(ref) - len(ref) // 20
    for split, expect in (("train", ref[:cut]), ("val", ref[cut:])):
        from_glob = data.load_dataset(str(pq_dir / "*.parquet"), tok, split, 3, str(tmp_path / "cache"))
        from_dir = data.load_dataset(str(pq_dir), tok, split, 3, str(tmp_path / "cache"))
        from_jsonl = data.load_dataset(str(jsonl_dir), tok, split, 3, str(tmp_path / "cache"))
        assert split_tokens(from_glob) == split_tokens(from_dir) == split_tokens(from_jsonl) == expect


def test_parquet_is_read_in_batches_of_the_text_column(tmp_path):
    """Row group 1's text and row group 0's "id" are overwritten with garbage: reading the
    whole file (pq.read_table) or every column fails at once; streaming the text column
    yields the documents of row group 0 before it reaches the garbage."""
    pq = pytest.importorskip("pyarrow.parquet")
    docs = [f"doc {i}" for i in range(2200)]  # row groups of 1100 rows > the reader's 1024-row batches
    path = write_parquet(tmp_path / "c.parquet", {"text": docs, "id": list(range(2200))}, row_group_size=1100,
                         use_dictionary=False, compression="none")
    meta, raw = pq.ParquetFile(path).metadata, bytearray(path.read_bytes())
    for rg, col in ((1, 0), (0, 1)):  # (row group, column): text of group 1, id of group 0
        start, n = meta.row_group(rg).column(col).data_page_offset, meta.row_group(rg).column(col).total_compressed_size
        raw[start:start + n] = b"\xff" * n  # the page headers no longer parse
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError):
        pq.read_table(path)
    got = []
    with pytest.raises(ValueError, match="c.parquet: cannot read as Parquet"):
        for doc, _ in data.read_documents(path):
            got.append(doc)
    assert len(got) >= 1024 and got == docs[:len(got)]


def test_parquet_null_text_is_skipped_and_counted(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "n.parquet", {"text": ["a", None, "b", None]})
    got = list(data.read_documents(path))
    assert [d for d, _ in got] == ["a", "b"] and got[-1][1] == path.stat().st_size * 3 // 4
    assert "n.parquet: skipped 2 of 4 rows whose text is null" in capsys.readouterr().out
    write_parquet(tmp_path / "allnull.parquet", {"text": pa.array([None, None], pa.string())})
    with pytest.raises(ValueError, match=r"allnull.parquet: no documents \(2 rows, 2 with null text\)"):
        list(data.read_documents(tmp_path / "allnull.parquet"))


@pytest.mark.parametrize("name, columns, match", [
    ("nocol.parquet", {"content": ["x"], "id": [1]}, r"nocol.parquet: no column 'text' \(columns: content, id\)"),
    ("intcol.parquet", {"text": [1, 2]}, r"intcol.parquet: column 'text' has type int64, expected string"),
    ("garbage.parquet", None, r"garbage.parquet: cannot read as Parquet"),
])
def test_bad_parquet_input(tok, tmp_path, name, columns, match):
    if columns is None:
        (tmp_path / name).write_bytes(b"not a parquet file")
    else:
        write_parquet(tmp_path / name, columns)
    with pytest.raises(ValueError, match=match):
        data.load_dataset(str(tmp_path / name), tok, "train", 3, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=match):
        data.prepare([str(tmp_path / name)], str(tmp_path / "out"), tok, 100, 1)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    import ast

    tree = ast.parse(Path(data.__file__).read_text())
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert "pyarrow" not in top  # imported by read_parquet only
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"x.parquet: reading .parquet needs pyarrow: pip install pyarrow"):
        list(data.read_documents(tmp_path / "x.parquet"))


def test_prepare_parquet_equals_jsonl(tok, parquet_corpus, tmp_path):
    pq_dir, jsonl_dir, docs = parquet_corpus
    from_pq = data.prepare([str(pq_dir / "*.parquet")], str(tmp_path / "pq"), tok, 1000, 2)
    from_jsonl = data.prepare([str(jsonl_dir)], str(tmp_path / "jsonl"), tok, 1000, 2)
    assert len(from_pq) == len(from_jsonl) > 2
    for a, b in zip(from_pq, from_jsonl):
        assert Path(a).read_bytes() == Path(b).read_bytes()
        assert Path(a + ".json").read_text() == Path(b + ".json").read_text()
    assert np.concatenate([np.fromfile(p, dtype="<u4") for p in from_pq]).tolist() == reference_stream(tok, docs)


def test_prepare_cli_parquet_progress(tok, parquet_corpus, tmp_path):
    import re

    pq_dir, _, docs = parquet_corpus
    cmd = [sys.executable, str(Path(data.__file__)), "prepare", str(pq_dir / "*.parquet"), "--out",
           str(tmp_path / "cli"), "--workers", "1", "--progress-every", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert np.fromfile(tmp_path / "cli" / "shard-00000.bin", dtype="<u4").tolist() == reference_stream(tok, docs)
    lines = run.stdout.splitlines()
    assert any(re.fullmatch(r"prepare: [0-2]/2 files, [\d,]+ tokens, [\d.,]+ MB/s, ETA (\d+:\d\d:\d\d|\?)", x)
               for x in lines), run.stdout
    n = len(reference_stream(tok, docs))
    assert re.fullmatch(rf"prepare: done: 2/2 files, {n:,} tokens, [\d.,]+ MB in \d+:\d\d:\d\d \([\d.,]+ MB/s\), "
                        rf"1 shards in {re.escape(str(tmp_path / 'cli'))}", lines[-1]), run.stdout


def test_train_on_parquet(parquet_corpus, tmp_path):
    import train
    from distributed import train_argv

    pq_dir, _, _ = parquet_corpus
    history = train.main(train_argv(str(tmp_path / "run"), f"data.dataset={pq_dir / '*.parquet'}",
                                    f"data.cache_dir={tmp_path / 'cache'}", "training.steps=3"))
    assert [r["step"] for r in history] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in history)
    assert [p.suffix for p in sorted((tmp_path / "cache").iterdir())] == [".bin", ".json"]  # one cached stream


def test_parquet_exact_resume(tok, parquet_corpus, tmp_path):
    pq_dir, _, docs = parquet_corpus
    ds = data.load_dataset(str(pq_dir / "*.parquet"), tok, "train", L, str(tmp_path / "cache"))
    full = data.DataLoader(ds, L, 8, 2, 0, 1, seed=3)
    steps_per_epoch = full.steps_per_epoch
    ref = [next(full) for _ in range(4 * (steps_per_epoch + 3))]  # into the second epoch
    for k in (5, 4 * steps_per_epoch - 2):  # mid-accumulation (4 micro batches a step); before the epoch ends
        first = data.DataLoader(ds, L, 8, 2, 0, 1, seed=3)
        for _ in range(k):
            next(first)
        resumed = data.DataLoader(ds, L, 8, 2, 0, 1, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for want in ref[k:k + 12]:
            got = next(resumed)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    windows = {tuple(w) for w in np.array(reference_stream(tok, docs)[:len(ds) * (L + 1)]).reshape(-1, L + 1)}
    x, y = ref[0]
    assert all(tuple(torch.cat([x[i], y[i, -1:]]).tolist()) in windows for i in range(2))
