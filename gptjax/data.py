"""Text sources -> token id arrays (cached on disk) -> batches.

Data flows one way: a *source* gives train and validation documents (loaded
with Hugging Face `datasets`, from local files or the hub), a tokenizer turns
them into ids, the ids are written once to a `uint16`/`uint32` file keyed by a
fingerprint of (source, split, tokenizer) and memory-mapped by every later run,
and `get_batch` cuts random windows out of them. The windows of a step depend
only on (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would.

`python -m gptjax.data --config configs/tinystories.py` prepares a config's
data (download, tokenizer training, tokenization) without training.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request

import numpy as np

from gptjax.errors import UserError
from gptjax.runtime import cache_dir

DATA_DIR_ENV = "GPTJAX_DATA_DIR"

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Streams keep the train sampler, the train-loss estimate and the validation
# estimate from ever drawing the same random numbers.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


def read_text_file(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist; check data.path (or {DATA_DIR_ENV}).")
    if os.path.isdir(path):
        raise UserError(f"data.path {path} is a folder; give a text file.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not text.strip():
        raise UserError(f"data file {path} is empty; give a file with text in it.")
    return text


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_verified(url: str, dest: str, sha256: str, hint: str) -> str:
    """Download `url` once to `dest`, checking its sha256; reuse it afterwards."""
    if os.path.exists(dest) and _sha256(dest) == sha256:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}). {hint}") from None
    got = _sha256(tmp)
    if got != sha256:
        os.remove(tmp)
        raise UserError(f"download of {url} has sha256 {got}, expected {sha256}; try again later. {hint}")
    os.replace(tmp, dest)
    return dest


def tinyshakespeare_path() -> str:
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = os.path.join(data_dir, "tinyshakespeare", "input.txt")
        if os.path.exists(local):
            return local
    hint = (
        f"To work offline, set {DATA_DIR_ENV} to a folder holding tinyshakespeare/input.txt, "
        "or point --config.data.path at a local text file."
    )
    return download_verified(
        TINYSHAKESPEARE_URL,
        os.path.join(cache_dir(), "tinyshakespeare", "input.txt"),
        TINYSHAKESPEARE_SHA256,
        hint,
    )


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    n = int(len(text) * (1.0 - val_fraction))
    return text[:n], text[n:]


# ----------------------------------------------------------------------------- sources

KNOWN_DATASETS = ("tinyshakespeare", "tinystories", "wikitext2", "wikitext103", "openwebtext", "text", "hf")
TEXT_EXTS = (".txt",)
JSON_EXTS = (".json", ".jsonl")
PARQUET_EXTS = (".parquet",)
FILE_EXTS = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS
EOT_MARK = "<|endoftext|>"
VAL_SPLIT_SEED = 2357  # rows cut out for validation, where a source has no validation split
STREAM_VAL_DOCS = 1000  # validation documents taken off the front of a streamed train split
CACHE_VERSION = 1  # bump when the token files' meaning changes


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a config's text comes from: local files or a hub dataset."""

    label: str  # for messages: "tinystories (local)", "hub roneneldan/TinyStories", ...
    train_files: tuple = ()
    val_files: tuple = ()  # empty: validation is cut from the training rows
    hf_name: str = ""
    hf_config: str = ""
    hf_train_split: str = "train"
    hf_val_split: str = ""  # empty: validation is cut from the training rows
    text_field: str = "text"
    by_line: bool = False  # rows are the lines of one text: no end-of-text between them
    val_fraction: float = 0.1
    streaming: bool = False

    @property
    def is_hub(self) -> bool:
        return bool(self.hf_name)

    def identity(self) -> dict:
        """What the source is, independent of file times: a resume must match it."""
        d = dataclasses.asdict(self)
        d.pop("label")
        return d

    def fingerprint(self) -> str:
        """identity() plus the size and mtime of every local file."""
        stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.train_files + self.val_files]
        return _digest([CACHE_VERSION, self.identity(), stats])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def resolve_files(path: str) -> tuple:
    """A file, a folder (searched recursively) or a glob -> sorted file paths."""
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, dirs, names in os.walk(path)
            for name in names
            if name.lower().endswith(FILE_EXTS) and not name.startswith(".")
        )
        if not files:
            raise UserError(f"folder {path} has no {', '.join(FILE_EXTS)} files; put text files in it or "
                            "point data.path at a file.")
        return tuple(os.path.abspath(f) for f in files)
    if os.path.isfile(path):
        return (os.path.abspath(path),)
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"data.path pattern {path} matches no files.")
        return tuple(os.path.abspath(f) for f in files)
    raise UserError(f"data file {path} does not exist; check data.path (or {DATA_DIR_ENV}).")


def _local(*parts: str) -> str | None:
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        p = os.path.join(data_dir, *parts)
        if os.path.exists(p):
            return os.path.abspath(p)
    return None


def _local_pair(folder: str, val_name: str = "valid.txt") -> tuple | None:
    train, val = _local(folder, "train.txt"), _local(folder, val_name)
    return (train, val) if train and val else None


def resolve_source(d) -> Source:
    """The Source for a config's `data` section (cheap: nothing is read yet)."""
    field, frac = d.text_field, d.val_fraction
    if d.dataset not in KNOWN_DATASETS:
        raise UserError(f"unknown dataset {d.dataset!r}; known: {', '.join(KNOWN_DATASETS)} "
                        "(text: your own files via data.path; hf: any hub dataset via data.hf_name).")
    if d.path:  # local files win over a named dataset
        return Source(f"{d.path}", train_files=resolve_files(d.path), text_field=field, val_fraction=frac)
    if d.dataset == "text":
        raise UserError("data.dataset=text needs data.path: a text file, a folder or a glob of "
                        ".txt/.jsonl/.json/.parquet files.")
    if d.dataset == "hf":
        if not d.hf_name:
            raise UserError("data.dataset=hf needs data.hf_name, e.g. --config.data.hf_name=roneneldan/TinyStories.")
        return Source(f"hub {d.hf_name}", hf_name=d.hf_name, hf_config=d.hf_config, hf_train_split=d.hf_train_split,
                      hf_val_split=d.hf_val_split, text_field=field, val_fraction=frac, streaming=d.streaming)
    if d.dataset == "tinyshakespeare":
        return Source("tinyshakespeare", train_files=(os.path.abspath(tinyshakespeare_path()),), val_fraction=frac)
    if d.dataset == "tinystories":
        pair = _local_pair("tinystories")
        if pair:
            return Source("tinystories (local)", train_files=pair[:1], val_files=pair[1:])
        return Source("tinystories", hf_name="roneneldan/TinyStories", hf_val_split="validation",
                      streaming=d.streaming)
    if d.dataset in ("wikitext2", "wikitext103"):
        folder = {"wikitext2": "wikitext-2", "wikitext103": "wikitext-103"}[d.dataset]
        pair = _local_pair(folder)
        if pair:
            return Source(f"{d.dataset} (local)", train_files=pair[:1], val_files=pair[1:], by_line=True)
        return Source(d.dataset, hf_name="Salesforce/wikitext", hf_config=f"{folder}-v1",
                      hf_val_split="validation", by_line=True, streaming=d.streaming)
    assert d.dataset == "openwebtext"
    local = _local("openwebtext")
    if local:
        return Source("openwebtext (local)", train_files=resolve_files(local), text_field=field, val_fraction=frac)
    return Source("openwebtext", hf_name="Skylion007/openwebtext", val_fraction=frac, streaming=d.streaming)


# ----------------------------------------------------------------------------- loading rows with `datasets`

def _quiet_datasets():
    import datasets

    datasets.logging.set_verbosity_error()
    return datasets


def _offline_hint() -> str:
    return (f"Offline? Set {DATA_DIR_ENV} to a folder with local copies (see README 'Datasets and tokenizers') "
            "or point --config.data.path at local files.")


def _text_column(ds, field: str, where: str):
    """Keep one string column, named `text`; a column of string lists becomes one row per string."""
    datasets = _quiet_datasets()
    names = list(ds.column_names or [])
    if field not in names:
        raise UserError(f"{where} has no field {field!r}; its fields are {names}. "
                        f"Set --config.data.text_field to one of them.")
    feat = ds.features[field] if ds.features else None
    if isinstance(feat, (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))):
        return ds.map(lambda b: {"text": [s for row in b[field] for s in row]}, batched=True, remove_columns=names)
    if feat is not None and getattr(feat, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{where}: field {field!r} holds {feat}, not text; set --config.data.text_field "
                        f"to a text field (fields: {names}).")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def _first_undecodable(files) -> str | None:
    import codecs

    for f in files:
        dec = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(f, "rb") as fh:
            try:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    dec.decode(chunk)
                    offset += len(chunk)
                dec.decode(b"", final=True)
            except UnicodeDecodeError as e:
                return f"{f} is not UTF-8 text ({e.reason} near byte {offset + e.start})"
    return None


def _split_documents(batch):
    """Split rows at `<|endoftext|>` marks (the layout of TinyStories' own text files)."""
    out = []
    for text in batch["text"]:
        if EOT_MARK in text:
            out.extend(part.strip("\n") for part in text.split(EOT_MARK))
        else:
            out.append(text)
    return {"text": [t for t in out if t.strip()]}


def load_files(files, text_field: str = "text", by_line: bool = False):
    """A `datasets.Dataset` of documents (or lines, by_line) with one column `text`."""
    datasets = _quiet_datasets()
    parts = []
    groups = [("text", TEXT_EXTS), ("json", JSON_EXTS), ("parquet", PARQUET_EXTS)]
    for builder, exts in groups:
        if builder == "text":  # anything not json/parquet is read as text
            group = [f for f in files if not f.lower().endswith(JSON_EXTS + PARQUET_EXTS)]
        else:
            group = [f for f in files if f.lower().endswith(exts)]
        if not group:
            continue
        where = group[0] if len(group) == 1 else f"{len(group)} {builder} files like {group[0]}"
        try:
            if builder == "text":
                ds = datasets.load_dataset("text", data_files=group, split="train", keep_linebreaks=True,
                                           sample_by="line" if by_line else "document")
            else:
                ds = datasets.load_dataset(builder, data_files=group, split="train")
        except UserError:
            raise
        except Exception as e:  # datasets wraps reader errors in DatasetGenerationError
            bad = _first_undecodable(group)
            if bad:
                raise UserError(bad + "; convert it to UTF-8 or leave it out.") from None
            cause = e.__cause__ or e
            raise UserError(f"could not read {where}: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}") \
                from None
        if builder != "text":
            ds = _text_column(ds, text_field, where)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not by_line:
        ds = ds.map(_split_documents, batched=True)
    if len(ds) == 0 or (by_line and not any(t.strip() for t in ds["text"])):
        raise UserError(f"{files[0] if len(files) == 1 else f'the {len(files)} files of data.path'} "
                        "is empty; give files with text in them.")
    return ds


def load_hub(source: Source, split: str):
    datasets = _quiet_datasets()
    name = source.hf_name + (f" ({source.hf_config})" if source.hf_config else "")
    try:
        ds = datasets.load_dataset(source.hf_name, source.hf_config or None, split=split,
                                   streaming=source.streaming)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load the Hugging Face dataset {name}, split {split!r}: {reason}. "
                        + _offline_hint()) from None
    if source.streaming and ds.column_names is None and hasattr(ds, "_resolve_features"):
        ds = ds._resolve_features()  # a streamed dataset learns its columns from its first rows
    return _text_column(ds, source.text_field, f"hub dataset {name}")


def load_rows(source: Source):
    """(train_rows, val_rows, docs): `datasets` objects with a `text` column.

    docs is True when rows are separate documents (an end-of-text token goes
    after each); a single text is split by characters (data.val_fraction),
    as nanoGPT splits Tiny Shakespeare.
    """
    datasets = _quiet_datasets()
    docs = not source.by_line
    if source.is_hub:
        train = load_hub(source, source.hf_train_split)
        if source.hf_val_split:
            return train, load_hub(source, source.hf_val_split), docs
        if source.streaming:
            return train.skip(STREAM_VAL_DOCS), train.take(STREAM_VAL_DOCS), docs
        parts = train.train_test_split(test_size=_val_rows(len(train), source.val_fraction),
                                       seed=VAL_SPLIT_SEED, shuffle=True)
        return parts["train"], parts["test"], docs
    train = load_files(source.train_files, source.text_field, source.by_line)
    if source.val_files:
        return train, load_files(source.val_files, source.text_field, source.by_line), docs
    if len(train) == 1 or source.by_line:  # one text: the last val_fraction of its characters validates
        text = "".join(train["text"])
        tr, va = split_text(text, source.val_fraction)
        return datasets.Dataset.from_dict({"text": [tr]}), datasets.Dataset.from_dict({"text": [va]}), False
    parts = train.train_test_split(test_size=_val_rows(len(train), source.val_fraction),
                                   seed=VAL_SPLIT_SEED, shuffle=True)
    return parts["train"], parts["test"], docs


def _val_rows(n: int, fraction: float) -> int:
    if n < 2:
        raise UserError("need at least two documents to cut a validation split from; add text.")
    return min(n - 1, max(1, round(n * fraction)))


def iter_texts(rows, batch_size: int = 1000):
    for batch in rows.iter(batch_size=batch_size):
        yield from batch["text"]


# ----------------------------------------------------------------------------- tokenizers

def tokenizer_spec(d) -> dict:
    """What decides the tokenizer besides the training text."""
    tok = d.tokenizer
    if tok == "sentencepiece":
        return {"kind": tok, "vocab_size": d.vocab_size, "model_type": d.sp_model_type, "max_chars": d.sp_max_chars}
    if tok.endswith(".model"):
        return {"kind": "sentencepiece", "model_file": os.path.abspath(tok)}
    return {"kind": tok}


def build_tokenizer(d, train_rows, val_rows, docs: bool):
    from gptjax import tokenizers as tok_lib

    if d.tokenizer == "char":
        # The vocabulary covers train and validation text, so validation encodes too.
        chars = set()
        for rows in (train_rows, val_rows):
            for text in iter_texts(rows):
                chars.update(text)
        if docs:
            chars.add("\n")  # the separator between documents
        return tok_lib.CharTokenizer(chars)
    if d.tokenizer == "sentencepiece":
        return tok_lib.SentencePieceTokenizer.train(_capped_lines(train_rows, d.sp_max_chars),
                                                    d.vocab_size, d.sp_model_type)
    if d.tokenizer == "gpt2":
        return tok_lib.GPT2Tokenizer()
    if d.tokenizer.endswith(".model"):
        return tok_lib.SentencePieceTokenizer.from_file(d.tokenizer)
    raise UserError(f"unknown tokenizer {d.tokenizer!r}; known: char, sentencepiece, gpt2, or a path to a "
                    "sentencepiece .model file.")


def _capped_lines(rows, max_chars: int):
    """Lines of the training text, at most max_chars characters in all (keeps training to seconds)."""
    seen = 0
    for text in iter_texts(rows):
        for line in text.split("\n"):
            if line:
                yield line
                seen += len(line) + 1
                if seen >= max_chars:
                    return


# ----------------------------------------------------------------------------- the token cache

@dataclasses.dataclass
class Prepared:
    tokenizer: object
    train_ids: np.ndarray  # memory-mapped uint16/uint32
    val_ids: np.ndarray
    stats: dict  # split -> {"tokens", "chars", "bytes", "docs"}
    source: Source


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _encode_rows(batch, tokenizer, sep, num_threads=1):
    from gptjax.tokenizers import encode_batch

    texts = batch["text"]
    ids = encode_batch(tokenizer, texts, num_threads)
    if sep is not None:
        ids = [np.concatenate([a, sep]) for a in ids]
    return {"ids": ids, "chars": [len(t) for t in texts], "bytes": [len(t.encode("utf-8")) for t in texts]}


def write_tokens(rows, tokenizer, docs: bool, path: str, num_proc: int, desc: str) -> dict:
    """Tokenize rows into `path` (raw ids) and `path`.json (counts); temp names, then rename."""
    import datasets

    sep = None
    if docs:
        sep = (np.array([tokenizer.eot_id], np.int32) if tokenizer.eot_id is not None
               else tokenizer.encode("\n\n"))
    dtype = token_dtype(tokenizer.vocab_size)
    # Threads, not processes: the tokenizers' C++/Rust cores run in parallel without forking a
    # process that may already hold JAX's threads.
    threads = num_proc or min(8, os.cpu_count() or 1)
    fn = functools.partial(_encode_rows, tokenizer=tokenizer, sep=sep, num_threads=threads)
    stats = {"tokens": 0, "chars": 0, "bytes": 0, "docs": 0}
    tmp = f"{path}.tmp{os.getpid()}"
    arrow_tmp = f"{path}.arrow.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            if isinstance(rows, datasets.IterableDataset):  # streamed: one pass, in this process
                from tqdm import tqdm

                for batch in tqdm(rows.map(fn, batched=True, batch_size=1000, remove_columns=["text"]).iter(1000),
                                  desc=desc, unit="batch", disable=None):
                    for ids in batch["ids"]:
                        f.write(np.asarray(ids, dtype).tobytes())
                    stats["chars"] += sum(batch["chars"])
                    stats["bytes"] += sum(batch["bytes"])
                    stats["docs"] += len(batch["chars"])
            else:
                # The mapped rows go to a scratch Arrow file beside ours (not the datasets cache),
                # deleted once the ids are copied out.
                out = rows.map(fn, batched=True, batch_size=1000, remove_columns=rows.column_names,
                               cache_file_name=arrow_tmp, load_from_cache_file=False, desc=desc,
                               new_fingerprint=_digest([os.path.basename(path), len(rows)]))
                for chunk in out.data.column("ids").chunks:
                    f.write(chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype).tobytes())
                stats["chars"] = sum(out["chars"])
                stats["bytes"] = sum(out["bytes"])
                stats["docs"] = len(out)
        stats["tokens"] = os.path.getsize(tmp) // np.dtype(dtype).itemsize
        stats["dtype"] = np.dtype(dtype).name
        os.replace(tmp, path)
        meta_tmp = f"{path}.json.tmp{os.getpid()}"
        with open(meta_tmp, "w") as f:
            json.dump(stats, f)
        os.replace(meta_tmp, path + ".json")
    finally:
        for leftover in glob.glob(glob.escape(tmp) + "*") + glob.glob(glob.escape(arrow_tmp) + "*"):
            os.remove(leftover)
    return stats


def read_tokens(path: str):
    """(memory-mapped ids, stats), or None when the cache has no complete file."""
    try:
        with open(path + ".json") as f:
            stats = json.load(f)
        dtype = np.dtype(stats["dtype"])
        if os.path.getsize(path) != stats["tokens"] * dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError):
        return None
    if stats["tokens"] == 0:
        return np.zeros((0,), dtype), stats
    return np.memmap(path, dtype=dtype, mode="r"), stats


def prepare(cfg, workdir: str | None, log=print, tokenizer=None) -> Prepared:
    """Tokenizer (restored from the workdir, or the cache, or built) and cached token arrays.

    `tokenizer`: use this one for a new run (a fine-tune keeps its model's tokenizer).
    """
    from gptjax import tokenizers as tok_lib

    d = cfg.data
    source = resolve_source(d)
    spec = tokenizer_spec(d)
    src_fp = source.fingerprint()
    data_id = {"source": source.identity(), "tokenizer": spec}
    rows = {}

    def load():
        if not rows:
            log(f"data: loading {source.label}")
            rows["train"], rows["val"], rows["docs"] = load_rows(source)
        return rows["train"], rows["val"], rows["docs"]

    tok_dir = os.path.join(workdir, "tokenizer") if workdir else None
    # A workdir with checkpoints keeps its tokenizer (resume, sampling); one without is rebuilt freely.
    if tok_dir and os.path.exists(os.path.join(tok_dir, tok_lib.TOKENIZER_FILE)) and _has_checkpoints(workdir):
        _check_same_data(tok_dir, data_id, workdir)
        tokenizer = tok_lib.load_tokenizer(tok_dir)
    elif tokenizer is not None:
        if tok_dir:
            tokenizer.save(tok_dir)
            tok_lib._write_json(os.path.join(tok_dir, DATA_ID_FILE), data_id)
    else:
        cached = os.path.join(cache_dir(), "tokenizers", _digest([src_fp, spec]))
        if spec["kind"] in ("char", "sentencepiece") and "model_file" not in spec and \
                os.path.exists(os.path.join(cached, tok_lib.TOKENIZER_FILE)):
            tokenizer = tok_lib.load_tokenizer(cached)
        else:
            t0 = time.perf_counter()
            tokenizer = build_tokenizer(d, *load())
            if spec["kind"] != "gpt2":
                log(f"data: built the {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids) "
                    f"in {time.perf_counter() - t0:.1f}s")
                tmp = f"{cached}.tmp{os.getpid()}"
                tokenizer.save(tmp)
                shutil.rmtree(cached, ignore_errors=True)
                os.replace(tmp, cached)
        if tok_dir:
            tokenizer.save(tok_dir)
            tok_lib._write_json(os.path.join(tok_dir, DATA_ID_FILE), data_id)

    ids, stats = {}, {}
    for split in ("train", "val"):
        path = os.path.join(cache_dir(), "tokens", _digest([src_fp, split, tokenizer.fingerprint()]) + ".bin")
        hit = read_tokens(path)
        if hit is None:
            train_rows, val_rows, docs = load()
            write_tokens(train_rows if split == "train" else val_rows, tokenizer, docs, path, d.num_proc,
                         desc=f"tokenizing {split}")
            hit = read_tokens(path)
        ids[split], stats[split] = hit
        if stats[split]["tokens"] == 0:
            raise UserError(f"the {split} split of {source.label} has no text.")
    return Prepared(tokenizer, ids["train"], ids["val"], stats, source)


DATA_ID_FILE = "data.json"


def _has_checkpoints(workdir: str) -> bool:
    path = os.path.join(workdir, "checkpoints")
    return os.path.isdir(path) and any(os.scandir(path))


def _check_same_data(tok_dir: str, data_id: dict, workdir: str) -> None:
    """Refuse to resume on data that the saved tokenizer would not have been built for."""
    path = os.path.join(tok_dir, DATA_ID_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved == json.loads(json.dumps(data_id)):
        return
    diff = [k for k in ("source", "tokenizer") if saved.get(k) != json.loads(json.dumps(data_id[k]))]
    raise UserError(
        f"{workdir} was trained with a different data {' and '.join(diff)} "
        f"(saved: {json.dumps({k: saved.get(k) for k in diff}, sort_keys=True)}), so this run would tokenize "
        "differently; use a new --workdir, or the data settings of the original run."
    )


def check_length(ids: np.ndarray, block_size: int, what: str) -> None:
    if len(ids) < block_size + 1:
        raise UserError(
            f"the {what} split has {len(ids)} tokens, fewer than model.block_size+1 = {block_size + 1}; "
            "use more text or a smaller --config.model.block_size."
        )


def window_offsets(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int, stream: int = TRAIN_STREAM):
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def eval_windows(ids: np.ndarray, block_size: int, max_windows: int = 0):
    """Inputs and targets [n, block_size] cut from consecutive, non-overlapping windows:
    one pass over a split, for exact evaluation."""
    n = (len(ids) - 1) // block_size
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"the validation split has {len(ids)} tokens, fewer than block_size+1 = {block_size + 1}.")
    span = np.asarray(ids[: n * block_size + 1]).astype(np.int32)
    return span[:-1].reshape(n, block_size), span[1:].reshape(n, block_size)


def get_batch(ids: np.ndarray, block_size: int, batch_size: int, seed: int, step: int, stream: int = TRAIN_STREAM,
              rows=None):
    """Inputs and next-token targets, both int32 [batch_size, block_size].

    A pure function of its arguments: the batch at step k is the same in any
    process, which is what makes resume exact. `rows` (indices into the batch)
    cuts out only those windows: a process's share of the global batch.
    """
    offsets = window_offsets(len(ids), block_size, batch_size, seed, step, stream)
    if rows is not None:
        offsets = offsets[rows]
    windows = ids[offsets[:, None] + np.arange(block_size + 1)]
    windows = windows.astype(np.int32, copy=False)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------- `python -m gptjax.data`

def describe(p: Prepared) -> list[str]:
    lines = [f"source: {p.source.label}; tokenizer {p.tokenizer.kind}, vocab {p.tokenizer.vocab_size}"]
    for split, s in p.stats.items():
        lines.append(f"{split:>5}: {s['tokens']:>12,} tokens  {s['chars']:>13,} characters  {s['bytes']:>13,} bytes  "
                     f"{s['docs']:>9,} rows  {s['chars'] / max(1, s['tokens']):.2f} characters/token")
    return lines


def main(argv, config, workdir):
    from absl import logging

    from gptjax.errors import exit_with

    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        exit_with(UserError(f"unexpected arguments {argv[1:]}; config keys go as --config.SECTION.KEY=VALUE."))
    try:
        from gptjax import config as config_lib

        config_lib.validate(config)
        p = prepare(config, workdir)
        for line in describe(p):
            print(line, flush=True)
    except UserError as e:
        exit_with(e)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from gptjax import config as config_lib

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Also save the tokenizer in this run folder.")
    app.run(lambda argv: main(argv, _CONFIG.value, _WORKDIR.value),
            flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))
