"""Tokenizer, token datasets and the per-rank stateful loader for Llama 3 pretraining.

What it does
    Tokenizer: tiktoken byte-level BPE read from a ranks file (the format of Meta's
    Llama 3 `tokenizer.model`: one `base64(token bytes) rank` per line), Llama 3's split
    regex, and Llama 3's 256 special tokens appended after the base ranks in Meta's order
    (<|begin_of_text|> = bos, <|end_of_text|> = eos, ..., <|eot_id|> = base + 9). Meta's
    file gives n_words = 128256 and Meta's ids. Ordinary text never encodes to a special
    id: "<|eot_id|>" typed in a document is just text. A Hugging Face tokenizer.json of Llama 3's
    kind (byte-level BPE on the same regex) reads as the same ranks: its vocab strings mapped
    back from the ByteLevel alphabet to bytes, rank = id, its 256 added tokens as specials.
    Builtin tokenizer: tokenizer/builtin.tiktoken, 3840 ranks + 256 specials = 4096 (the
    debug preset's vocab_size), made by `python data.py train-tokenizer --vocab-size 3840
    --out tokenizer/builtin.tiktoken` on the builtin corpus's train split (CPython 3.11.7).
    Training counts regex chunks once, then merges with incremental pair counts and a lazy
    max-heap; ties go to the smallest (left id, right id). The stdlib `re` lacks \\p{L} and
    \\p{N}: they are expanded from `unicodedata` (on the builtin corpus, tiktoken's split).
    Builtin dataset: the running Python's stdlib *.py (no site-/dist-packages or test
    suites) by path, a document each; every 20th (index % 20 == 19) is val; non-UTF-8 skipped.
    User data: a path, directory or glob of .txt (a document per file), .jsonl (one per
    line, field "text"), .parquet (one per row, column "text": how FineWeb, FineWeb-Edu
    and DCLM ship) or .bin files (`python data.py prepare`).
    Parquet is read with pyarrow, imported only then: ParquetFile.iter_batches streams
    the "text" column alone, 1024 rows at a time, never a whole file or another column.
    A null text is skipped and the skips counted (printed per file); a missing or
    non-string "text" column is an error naming the file.
    User text is tokenized in batches of ~4M characters, whatever the format: load_dataset
    builds its cache (below) batch by batch, holding the text of one batch and the uint32
    stream; `prepare` encodes batches in worker processes, in order, holds about a shard
    of tokens, and prints files done, tokens, input MB/s and an ETA at most every 5 s.

Packing and windows
    Each document is encoded without bos and followed by eos; all documents concatenate
    into one stream, cut into non-overlapping windows of seq_len + 1 tokens: inputs w[:-1],
    labels w[1:]. Windows span documents (packing, no padding, no cross-document attention
    mask: TorchTitan's default); the tail that does not fill a window is dropped. For user
    data the val split is the last 1/20 of the token stream (text files or prepared .bin).

.bin format
    X.bin: raw little-endian uint32 token ids, no header, read with np.memmap (never
    loaded whole). X.bin.json, the sidecar: {"dtype": "uint32", "n_tokens", "max_id",
    "n_words", "tokenizer_sha256", "tokenizer"}, written last (temp file + os.replace): its
    presence is the commit point. A .bin of another tokenizer (sha256) is refused. Every
    window read is checked against model.vocab_size (one max; max_id misses bytes corrupted
    later): a bad id stops the run, naming the file and token offset. load_dataset caches
    .txt/.jsonl/.parquet/builtin text the same way in cache_dir, keyed by sha256(file names +
    sizes + mtimes, tokenizer sha256, split); racing ranks os.replace private temp files (atomic).

How ranks split a global batch
    Every optimizer step consumes one global batch of G = global_batch_size windows, in
    the order of a permutation of all windows from numpy's PCG64 seeded with (seed,
    epoch), redrawn each epoch (the last len % G windows are skipped). With accum = G //
    (micro_batch_size * dp_size), call k of `next()` on dp rank r returns windows
    [(k*dp_size + r)*mb, +mb) of the global batch: the ranks and micro-steps cover it
    exactly once, disjointly. (Every rank computes the permutation: 8 bytes per window.)

Determinism and resume
    The batches depend only on (dataset, seq_len, G, seed), never on timing. state_dict()
    is a few ints (epoch, step in epoch, micro-step, seed, G, seq_len, n_windows), the same
    on every rank; the global stream does not depend on dp_size or micro_batch_size, so a
    state saved with dp_size 4 resumes with dp_size 2 and sees the same global batches.

What TorchTitan does differently
    It streams Hugging Face datasets (c4) with a HF/tiktoken tokenizer, packs greedily per
    rank and checkpoints each rank's buffer position. We download nothing (the builtin corpus
    is on every machine), and a global permutation makes the state rank-independent.
"""

import argparse
import base64
import bisect
import collections
import contextlib
import glob
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import sys
import sysconfig
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
import torch

PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's llama3 tokenizer.py order (Llama 3.1+): 11 named, then reserved_2..reserved_246.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>"]
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 258 - len(SPECIAL_TOKENS))]
BUILTIN_TOKENIZER = Path(__file__).resolve().parent / "tokenizer" / "builtin.tiktoken"
VAL_EVERY = 20  # builtin: every 20th file is val; user data: the last 1/20 of the tokens
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "idle_test"}


# ----------------------------------------------------------------------------- tokenizer

def read_ranks(path: str) -> dict[bytes, int]:
    """Parse and validate a tiktoken ranks file; ValueError names the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'base64(token) rank', got {line[:60]!r}; "
                                 "is this a tiktoken ranks file (Llama 3 tokenizer.model)?")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: invalid base64 token "
                                 f"{parts[0][:60].decode(errors='replace')!r}") from None
            if not parts[1].isdigit():
                raise ValueError(f"{path}:{lineno}: rank {parts[1][:60].decode(errors='replace')!r} "
                                 "is not a non-negative integer")
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice (first with rank {ranks[token]})")
            if int(parts[1]) != len(ranks):
                raise ValueError(f"{path}:{lineno}: rank {int(parts[1])}, expected {len(ranks)}: "
                                 "ranks must be 0..n-1 in order")
            ranks[token] = len(ranks)
    if not ranks:
        raise ValueError(f"{path}: empty tokenizer file, expected 'base64(token) rank' lines")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # tiktoken cannot encode a byte that has no rank
        raise ValueError(f"{path}: byte-level BPE needs all 256 single bytes; {len(missing)} missing "
                         f"(first 0x{missing[0]:02x})")
    return ranks


def _byte_level_alphabet() -> dict[str, int]:
    """HF ByteLevel's (GPT-2's) character -> byte: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for chr(256 + k), in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


# The special ids data.py (bos, eos) and the chat format use; Llama 3.0 / 3.1 / 3.2 agree on
# these but name some others differently (3.2's <|step_id|> is 3.1's <|reserved_special_token_2|>).
_FIXED_SPECIALS = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6,
                   "<|end_header_id|>": 7, "<|eot_id|>": 9}


def read_hf_tokenizer(path: str) -> tuple[dict[bytes, int], list[str]]:
    """(ranks, special token names) of a Hugging Face tokenizer.json of Llama 3's kind:
    byte-level BPE splitting on PAT_STR, rank = id (merges are not read: tiktoken merges
    by the merged token's rank, the order Llama 3's merges list is in), then 256 added
    tokens right after the vocab. ValueError names the file and what differs."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: not a BPE tokenizer.json (model.type {(model or {}).get('type')!r}); "
                         "data.tokenizer takes Llama 3's tokenizer.json or a tiktoken ranks file")
    pre = spec.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    splits = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = any(s.get("type") == "ByteLevel" and s.get("use_regex") is False for s in steps)
    if spec.get("normalizer") is not None or splits != [PAT_STR] or not byte_level:
        raise ValueError(f"{path}: not Llama 3's byte-level BPE, which has no normalizer, one Split on data.PAT_STR "
                         f"and ByteLevel with use_regex false (found normalizer {spec.get('normalizer')!r}, "
                         f"split regexes {splits}, ByteLevel without regex: {byte_level})")
    added = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or []}
    alphabet, ranks = _byte_level_alphabet(), {}
    for token, rank in model["vocab"].items():
        if token in added:  # some exports list the added tokens in the vocab too
            continue
        if not all(c in alphabet for c in token):
            raise ValueError(f"{path}: vocab entry {token!r} has characters outside the ByteLevel alphabet: "
                             "not a byte-level BPE")
        ranks[bytes(alphabet[c] for c in token)] = rank
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: the vocab's ids are not 0..{n - 1} or it lacks some of the 256 single bytes; "
                         "tiktoken needs both")
    ids = sorted(i for i in added.values() if isinstance(i, int))
    fixed = {name: n + i for name, i in _FIXED_SPECIALS.items()}
    if ids != list(range(n, n + len(SPECIAL_TOKENS))) or any(added.get(k) != i for k, i in fixed.items()):
        raise ValueError(f"{path}: its added tokens are not Llama 3's special tokens: data.py needs "
                         f"{len(SPECIAL_TOKENS)} with ids {n}..{n + len(SPECIAL_TOKENS) - 1} right after the vocab, "
                         f"{fixed}; found {len(ids)} with ids {ids[:1]}..{ids[-1:]}, "
                         f"{ {k: added.get(k) for k in fixed} }")
    return dict(sorted(ranks.items(), key=lambda kv: kv[1])), sorted(added, key=added.get)


class Tokenizer:
    """Llama 3 tokenizer over any ranks file (or HF tokenizer.json): base ranks, then the
    256 special tokens."""

    def __init__(self, path: str):
        self.path, self.sha256 = str(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if str(path).endswith(".json"):  # a Hugging Face tokenizer.json: the same ids
            ranks, specials = read_hf_tokenizer(path)
        else:
            ranks, specials = read_ranks(path), SPECIAL_TOKENS
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(specials)}
        self.model = tiktoken.Encoding(name=Path(path).name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(specials)
        self.bos_id, self.eos_id = self.special_tokens["<|begin_of_text|>"], self.special_tokens["<|end_of_text|>"]

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        # encode_ordinary == disallowed_special=(): special names in text stay text.
        return [self.bos_id] * bos + self.model.encode_ordinary(s) + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.model.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.model.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


def load_tokenizer(spec: str) -> Tokenizer:
    path = BUILTIN_TOKENIZER if spec == "builtin" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found: set data.tokenizer to 'builtin' or "
                                "the path of a tiktoken ranks file (e.g. Llama 3's original/tokenizer.model) "
                                "or of a Hugging Face tokenizer.json (Llama 3's)")
    return Tokenizer(str(path))


def _stdlib_split_regex() -> re.Pattern:
    """PAT_STR for the stdlib `re`, which lacks \\p{..}: expand L and N from unicodedata."""
    def char_class(categories: set[str]) -> str:
        out, start = [], None
        for cp in range(sys.maxunicode + 2):
            inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)) in categories
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
                start = None
        return "".join(out)
    letters, numbers = char_class({"Lu", "Ll", "Lt", "Lm", "Lo"}), char_class({"Nd", "Nl", "No"})
    pat = PAT_STR.replace(r"\p{L}\p{N}", letters + numbers)  # inside [...]
    return re.compile(pat.replace(r"\p{L}", f"[{letters}]").replace(r"\p{N}", f"[{numbers}]"))


def train_bpe(texts: Iterable[str], vocab_size: int, log_every: int = 500) -> list[bytes]:
    """Byte-level BPE on PAT_STR chunks; returns the token bytes in rank order."""
    if vocab_size <= 256:
        raise ValueError(f"--vocab-size {vocab_size} must exceed the 256 byte tokens")
    split, t0 = _stdlib_split_regex(), time.time()
    counts = collections.Counter(chunk for text in texts for chunk in split.findall(text))
    words, freq = [list(w.encode("utf-8")) for w in counts], list(counts.values())  # unique chunks as token ids
    vocab = [bytes([b]) for b in range(256)]
    ids = {tok: i for i, tok in enumerate(vocab)}
    pairs: collections.defaultdict[tuple[int, int], int] = collections.defaultdict(int)
    where: collections.defaultdict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for wi, w in enumerate(words):
        for p in itertools.pairwise(w):
            pairs[p] += freq[wi]
            where[p].add(wi)
    # Max-heap of (-count, pair) with lazy deletion: an entry is live iff its count is current.
    heap = sorted((-c, p) for p, c in pairs.items())  # a sorted list is a heap
    print(f"train-tokenizer: {sum(freq):,} chunks, {len(words):,} unique, {time.time() - t0:.1f}s")
    while len(vocab) < vocab_size:
        while heap and -heap[0][0] != pairs.get(heap[0][1], 0):
            heapq.heappop(heap)
        if not heap:
            raise ValueError(f"corpus too small: no pair left to merge at vocab size {len(vocab)}")
        a, b = heapq.heappop(heap)[1]
        merged = vocab[a] + vocab[b]
        if merged not in ids:  # two merge paths can give the same bytes: reuse, take no rank
            ids[merged] = len(vocab)
            vocab.append(merged)
        new, changed = ids[merged], set()
        for wi in where.pop((a, b)):
            w, out, i = words[wi], [], 0
            while i < len(w):
                pair = i + 1 < len(w) and w[i] == a and w[i + 1] == b
                out.append(new if pair else w[i])
                i += 2 if pair else 1
            if len(out) == len(w):  # stale entry: an earlier merge already consumed the pair here
                continue
            for p in itertools.pairwise(w):
                pairs[p] -= freq[wi]
            for p in itertools.pairwise(out):
                pairs[p] += freq[wi]
                where[p].add(wi)
            changed.update(itertools.pairwise(w), itertools.pairwise(out))
            words[wi] = out
        for p in changed:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                del pairs[p]
        if (len(vocab) - 256) % log_every == 0 or len(vocab) == vocab_size:
            print(f"train-tokenizer: {len(vocab) - 256}/{vocab_size - 256} merges, {time.time() - t0:.1f}s")
    return vocab


def write_ranks(vocab: list[bytes], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(vocab)))


# ----------------------------------------------------------------------------- sources

def builtin_files(split: str) -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of the split's files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        rel += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    return root, [f for i, f in enumerate(sorted(rel)) if (i % VAL_EVERY == VAL_EVERY - 1) == (split == "val")]


def builtin_documents(split: str) -> list[str]:
    root, files = builtin_files(split)
    docs = []
    for f in files:
        with contextlib.suppress(UnicodeDecodeError):  # counted below
            docs.append((root / f).read_bytes().decode("utf-8"))
    if len(docs) < len(files):
        print(f"data: builtin {split}: skipped {len(files) - len(docs)} files that are not UTF-8")
    return docs


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")  # documents; .bin files hold tokens


def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (its .txt/.jsonl/.parquet/.bin files) or a glob -> sorted files."""
    if os.path.isdir(spec):
        files = [p for p in Path(spec).iterdir() if p.suffix in (*TEXT_SUFFIXES, ".bin")]
    elif glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(spec) if os.path.isfile(p)]
    else:
        files = [Path(spec)] if os.path.exists(spec) else []
    if not files:
        raise FileNotFoundError(f"dataset {spec!r} matches no file: give 'builtin' or a path, "
                                "directory or glob of .txt, .jsonl, .parquet or .bin files")
    for p in files:
        if p.suffix not in (*TEXT_SUFFIXES, ".bin"):
            raise ValueError(f"{p}: unknown extension {p.suffix!r}; use .txt, .jsonl (field 'text'), "
                             ".parquet (column 'text') or .bin (from `python data.py prepare`)")
    return sorted(files)


def read_parquet(path: Path, batch_rows: int = 1024) -> Iterator[tuple[str, int]]:
    """(text, ~bytes of the file read) per row of column "text", batch_rows rows at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    size, done, n_null = path.stat().st_size, 0, 0
    try:
        with pq.ParquetFile(path) as f:
            schema, rows = f.schema_arrow, f.metadata.num_rows
            if "text" not in schema.names:
                raise ValueError(f"{path}: no column 'text' (columns: {', '.join(schema.names)}); "
                                 "the documents must be a string column named 'text'")
            kind = schema.field("text").type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise ValueError(f"{path}: column 'text' has type {kind}, expected string")
            for batch in f.iter_batches(batch_size=batch_rows, columns=["text"]):  # never the whole file
                for doc in batch.column(0).to_pylist():
                    done += 1
                    if doc is None:
                        n_null += 1
                    else:
                        yield doc, size * done // rows
    except (pa.ArrowException, OSError) as e:  # not Parquet, or a corrupt page
        raise ValueError(f"{path}: cannot read as Parquet ({e})") from None
    if n_null:
        print(f"data: {path}: skipped {n_null:,} of {done:,} rows whose text is null")
    if done == n_null:
        raise ValueError(f"{path}: no documents ({done} rows, {n_null} with null text)")


def read_documents(path: Path) -> Iterator[tuple[str, int]]:
    """(document, bytes of the file read so far) for each document of one .txt (the whole
    file), .jsonl (one per line) or .parquet (one per row) file."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    if path.suffix == ".parquet":
        yield from read_parquet(path)
        return
    if path.suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8") from None
        yield text, path.stat().st_size
        return
    n_docs, pos = 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            pos += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); .jsonl needs one object per line") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise ValueError(f"{path}:{lineno}: no string field \"text\"; each .jsonl line must be "
                                 "an object like {\"text\": \"...\"}")
            n_docs += 1
            yield doc["text"], pos
    if n_docs == 0:
        raise ValueError(f"{path}: no documents (only blank lines)")


def doc_batches(files: list[Path], chars: int = 1 << 22) -> Iterator[tuple[list[str], int, int]]:
    """Documents in order, in batches of ~chars characters, each with (files done, input
    bytes read) at its end: what `prepare` reports as progress."""
    batch, n_chars, files_done, bytes_done = [], 0, 0, 0
    for p in files:
        for doc, pos in read_documents(p):
            batch.append(doc)
            n_chars += len(doc)
            if n_chars >= chars:
                yield batch, files_done, bytes_done + pos
                batch, n_chars = [], 0
        files_done, bytes_done = files_done + 1, bytes_done + p.stat().st_size
    if batch:
        yield batch, files_done, bytes_done


def _stream(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents -> one uint32 stream, each document followed by eos."""
    return np.array([t for ids in tokenizer.encode_batch(docs) for t in (*ids, tokenizer.eos_id)], dtype="<u4")


# ----------------------------------------------------------------------------- .bin files

def write_bin(path: str, tokens: np.ndarray, tokenizer: Tokenizer) -> None:
    """Write X.bin then its sidecar X.bin.json, each via a private temp file + os.replace."""
    tokens = np.ascontiguousarray(tokens, dtype="<u4")
    meta = {"dtype": "uint32", "n_tokens": int(tokens.size), "max_id": int(tokens.max(initial=0)),
            "n_words": tokenizer.n_words, "tokenizer_sha256": tokenizer.sha256, "tokenizer": tokenizer.path}
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique: several ranks may race here
    tokens.tofile(tmp)
    os.replace(tmp, path)
    Path(tmp).write_text(json.dumps(meta))
    os.replace(tmp, f"{path}.json")


def read_bin(path: str, tokenizer: Tokenizer) -> tuple[np.ndarray, dict]:
    """(memmap of the tokens, sidecar) after checking the sidecar against the file and tokenizer."""
    side = f"{path}.json"
    if not os.path.exists(side):
        raise ValueError(f"{path}: sidecar {side} is missing; recreate the shard with `python data.py prepare`")
    try:
        meta = json.loads(Path(side).read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{side}: invalid JSON ({e}); re-run `python data.py prepare`") from None
    for key in ("dtype", "n_tokens", "max_id", "tokenizer_sha256"):
        if not isinstance(meta, dict) or key not in meta:
            raise ValueError(f"{side}: the sidecar has no {key!r}; re-run `python data.py prepare`")
    if meta["dtype"] != "uint32":
        raise ValueError(f"{side}: dtype {meta['dtype']!r}, expected 'uint32'")
    if meta["tokenizer_sha256"] != tokenizer.sha256:
        raise ValueError(f"{path} was tokenized with tokenizer sha256 {meta.get('tokenizer_sha256')} "
                         f"({meta.get('tokenizer')}), but the current tokenizer {tokenizer.path} has sha256 "
                         f"{tokenizer.sha256}; re-run `python data.py prepare` or set data.tokenizer")
    if os.path.getsize(path) != 4 * meta["n_tokens"] or meta["n_tokens"] == 0:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes but the sidecar says {meta['n_tokens']} "
                         "uint32 tokens (truncated or empty); re-run `python data.py prepare`")
    return np.memmap(path, dtype="<u4", mode="r"), meta


# ----------------------------------------------------------------------------- dataset

class TokenDataset:
    """Windows of seq_len + 1 tokens over tokens [start, stop) of the shards' concatenation."""

    def __init__(self, name: str, shards: list[np.ndarray], seq_len: int, start: int = 0,
                 stop: int | None = None, max_id: int | None = None, paths: list[str] | None = None):
        self.name, self.shards, self.seq_len, self.start = name, shards, seq_len, start
        self.paths = paths or [f"{name} shard {k}" for k in range(len(shards))]  # what errors name
        self.offsets = np.cumsum([0] + [len(s) for s in shards]).tolist()  # shard k starts here
        self.n_tokens = (self.offsets[-1] if stop is None else stop) - start
        self.max_id = max(int(s.max(initial=0)) for s in shards) if max_id is None else max_id
        self.vocab_size: int | None = None  # set by check_vocab: every read is then checked

    def __len__(self) -> int:
        return self.n_tokens // (self.seq_len + 1)

    def tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of this split as int64, possibly spanning shards."""
        pos, pieces = self.start + start, []
        while n > 0:
            k = bisect.bisect_right(self.offsets, pos) - 1
            piece = self.shards[k][pos - self.offsets[k]: pos - self.offsets[k] + n]
            pieces.append(piece)
            pos, n = pos + len(piece), n - len(piece)
        out, v = np.concatenate(pieces), self.vocab_size
        if v is not None and (out.max() >= v or (out.dtype.kind == "i" and out.min() < 0)):  # one max per read
            pos = self.start + start + int(np.flatnonzero((out >= v) | (out < 0))[0])  # only now look for where
            k = bisect.bisect_right(self.offsets, pos) - 1
            raise ValueError(f"{self.paths[k]}: token id {self.shards[k][pos - self.offsets[k]]} at token offset "
                             f"{pos - self.offsets[k]} is outside model.vocab_size {v}; the file is corrupt: check it, "
                             "or re-run `python data.py prepare` (a file in data.cache_dir: delete it to rebuild)")
        return out.astype(np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {self.name} ({len(self)} windows)")
        return self.tokens(i * (self.seq_len + 1), self.seq_len + 1)


def check_vocab(source: "Tokenizer | TokenDataset", vocab_size: int) -> None:
    """Token ids must be < model.vocab_size (embedding rows); a dataset keeps the limit to check every read."""
    top = source.n_words - 1 if isinstance(source, Tokenizer) else source.max_id
    name = source.path if isinstance(source, Tokenizer) else source.name
    if isinstance(source, TokenDataset):
        source.vocab_size = vocab_size
    if top >= vocab_size:
        raise ValueError(f"{name}: token id {top} >= model.vocab_size {vocab_size}; use a tokenizer with "
                         f"at most {vocab_size} tokens or raise model.vocab_size")


def _cached_stream(cache_dir: str, stem: str, key: dict, batches, tokenizer: Tokenizer) -> str:
    """Path of the cached token stream for `key`; if absent, tokenize the document batches
    of `batches()` one at a time and write it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{stem}-{digest}.bin")
    if not os.path.exists(path + ".json"):  # the sidecar is the commit point
        t0 = time.time()
        os.makedirs(cache_dir, exist_ok=True)
        tokens = np.concatenate([np.empty(0, "<u4"), *(_stream(tokenizer, docs) for docs in batches())])
        write_bin(path, tokens, tokenizer)
        print(f"data: tokenized {stem}: {tokens.size:,} tokens in {time.time() - t0:.1f}s -> {path}")
    return path


def load_dataset(spec: str, tokenizer: Tokenizer, split: str, seq_len: int, cache_dir: str,
                 vocab_size: int | None = None) -> TokenDataset:
    """'builtin' or a path/dir/glob of .txt/.jsonl/.parquet/.bin -> the split's windows (see docstring)."""
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}: expected 'train' or 'val'")
    if seq_len < 1:
        raise ValueError(f"data.seq_len {seq_len} must be >= 1")
    if spec == "builtin":  # split by file: each split is a whole stream
        root, files = builtin_files(split)
        key = {"files": [(f, (root / f).stat().st_size, (root / f).stat().st_mtime_ns) for f in files],
               "root": str(root), "tokenizer": tokenizer.sha256, "split": split}
        paths = [_cached_stream(cache_dir, f"builtin-{split}", key, lambda: [builtin_documents(split)], tokenizer)]
    else:
        files = resolve_files(spec)
        if any(p.suffix == ".bin" for p in files):
            if not all(p.suffix == ".bin" for p in files):
                raise ValueError(f"dataset {spec!r} mixes .bin and text files; prepare the text files too")
            paths = [str(p) for p in files]
        else:  # text: one cached stream for both splits, cut like a .bin
            key = {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
                   "tokenizer": tokenizer.sha256}
            paths = [_cached_stream(cache_dir, "text", key, lambda: (docs for docs, *_ in doc_batches(files)),
                                    tokenizer)]
    shards, metas = zip(*(read_bin(p, tokenizer) for p in paths))
    n = sum(m["n_tokens"] for m in metas)
    cut = n - n // VAL_EVERY
    start, stop = (0, n) if spec == "builtin" else ((0, cut) if split == "train" else (cut, n))
    ds = TokenDataset(f"{spec} ({split})", list(shards), seq_len, start, stop, max(m["max_id"] for m in metas), paths)
    if vocab_size is not None:
        check_vocab(ds, vocab_size)
    return ds


# ----------------------------------------------------------------------------- loader

class DataLoader:
    """This dp rank's micro batches, (inputs, labels) int64 of shape (micro_batch_size, seq_len)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int):
        if seq_len != dataset.seq_len:
            raise ValueError(f"DataLoader seq_len {seq_len} != dataset {dataset.name} seq_len {dataset.seq_len}")
        if global_batch_size % (micro_batch_size * dp_size) != 0 or global_batch_size <= 0:
            raise ValueError(f"training.batch_size {global_batch_size} must be a positive multiple of "
                             f"training.micro_batch_size {micro_batch_size} x data-parallel degree {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size {dp_size})")
        if seed < 0:
            raise ValueError(f"training.seed {seed} must be >= 0")
        if len(dataset) < global_batch_size:
            raise ValueError(f"dataset {dataset.name} has {dataset.n_tokens:,} tokens, but one global batch needs "
                             f"{global_batch_size * (seq_len + 1):,} (batch_size {global_batch_size} x (seq_len "
                             f"{seq_len} + 1)); use more data or lower training.batch_size / data.seq_len")
        self.dataset, self.seq_len, self.seed, self.dp_rank, self.dp_size = dataset, seq_len, seed, dp_rank, dp_size
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.accum = global_batch_size // (micro_batch_size * dp_size)
        self.steps_per_epoch = len(dataset) // global_batch_size
        self.epoch, self.step, self.micro_step = 0, 0, 0  # the next micro batch to return
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:  # the same on every rank: seeded by (seed, epoch) only
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.step * self.global_batch_size + (self.micro_step * self.dp_size + self.dp_rank) * self.micro_batch_size
        idx = self._order()[first: first + self.micro_batch_size]
        batch = torch.from_numpy(np.stack([self.dataset[int(i)] for i in idx]))  # (mb, seq_len + 1)
        self.micro_step += 1
        if self.micro_step == self.accum:
            self.micro_step, self.step = 0, self.step + 1
            if self.step == self.steps_per_epoch:
                self.step, self.epoch = 0, self.epoch + 1
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "micro_step": self.micro_step, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "n_windows": len(self.dataset), "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        must_match = ["seed", "global_batch_size", "seq_len", "n_windows"]
        if state["micro_step"] != 0:  # mid-accumulation: the split of the global batch must match too
            must_match += ["micro_batch_size", "dp_size"]
        mine = self.state_dict()
        for key in must_match:
            if state[key] != mine[key]:
                raise ValueError(f"dataloader state: {key} is {state[key]} in the checkpoint but {mine[key]} now; "
                                 "resume with the same value or start a fresh run")
        self.epoch, self.step, self.micro_step = state["epoch"], state["step"], state["micro_step"]


# ----------------------------------------------------------------------------- prepare

_worker_tokenizer: Tokenizer | None = None  # one per prepare worker process


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _encode_docs(task: tuple[list[str], int, int]) -> tuple[np.ndarray, int, int]:
    docs, files_done, bytes_done = task
    return _stream(_worker_tokenizer, docs), files_done, bytes_done


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def prepare(inputs: list[str], out: str, tokenizer: Tokenizer, shard_tokens: int, workers: int,
            progress_every: float = 5.0) -> list[str]:
    """Tokenize .txt/.jsonl/.parquet inputs into out/shard-NNNNN.bin (shard_tokens each, the
    last shorter); a progress line at most every progress_every seconds, then a summary."""
    files = sorted({p for spec in inputs for p in resolve_files(spec)})
    if any(p.suffix == ".bin" for p in files):
        raise ValueError(f"prepare takes .txt/.jsonl/.parquet; {next(str(p) for p in files if p.suffix == '.bin')} "
                         "is already .bin")
    os.makedirs(out, exist_ok=True)
    total = sum(p.stat().st_size for p in files)  # input bytes: what MB/s and the ETA count
    written, buf, n_tokens, t0 = [], [], 0, time.time()
    last = t0

    def flush(tokens: np.ndarray) -> None:
        written.append(os.path.join(out, f"shard-{len(written):05d}.bin"))
        write_bin(written[-1], tokens, tokenizer)
        print(f"prepare: wrote {written[-1]} ({tokens.size:,} tokens)")

    with multiprocessing.Pool(workers, _init_worker, (tokenizer.path,)) as pool:
        # imap keeps document order; the batches are read by a thread of this process.
        for tokens, files_done, bytes_done in pool.imap(_encode_docs, doc_batches(files)):
            buf.append(tokens)
            n_tokens += tokens.size
            if time.time() - last >= progress_every:
                last = time.time()
                rate = bytes_done / max(last - t0, 1e-9)  # input bytes/s
                eta = _hms((total - bytes_done) / rate) if rate else "?"
                print(f"prepare: {files_done}/{len(files)} files, {n_tokens:,} tokens, "
                      f"{rate / 1e6:,.1f} MB/s, ETA {eta}", flush=True)
            while sum(b.size for b in buf) >= shard_tokens:
                stream = np.concatenate(buf)
                flush(stream[:shard_tokens])
                buf = [stream[shard_tokens:]]
    if sum(b.size for b in buf):
        flush(np.concatenate(buf))
    elapsed = max(time.time() - t0, 1e-9)
    print(f"prepare: done: {len(files)}/{len(files)} files, {n_tokens:,} tokens, {total / 1e6:,.1f} MB in "
          f"{_hms(elapsed)} ({total / 1e6 / elapsed:,.1f} MB/s), {len(written)} shards in {out}", flush=True)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="nanotitan data tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-tokenizer", help="train the builtin BPE on the builtin train split")
    t.add_argument("--vocab-size", type=int, default=3840, help="base ranks (256 bytes + merges)")
    t.add_argument("--out", default=str(BUILTIN_TOKENIZER))
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl/.parquet into .bin shards")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="builtin")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    s = sub.add_parser("stats", help="token counts of a dataset's splits")
    s.add_argument("--dataset", default="builtin")
    s.add_argument("--tokenizer", default="builtin")
    s.add_argument("--cache-dir", default=".cache/data")
    args = parser.parse_args()
    if args.cmd == "train-tokenizer":
        write_ranks(train_bpe(builtin_documents("train"), args.vocab_size), args.out)
        print(f"train-tokenizer: wrote {args.out}, sha256 {Tokenizer(args.out).sha256}")
    elif args.cmd == "prepare":
        prepare(args.inputs, args.out, load_tokenizer(args.tokenizer), args.shard_tokens, args.workers,
                args.progress_every)
    else:
        tok = load_tokenizer(args.tokenizer)
        for split in ("train", "val"):
            ds = load_dataset(args.dataset, tok, split, 1, args.cache_dir)
            print(f"{ds.name}: {ds.n_tokens:,} tokens, max id {ds.max_id}, tokenizer n_words {tok.n_words}")


if __name__ == "__main__":
    main()
