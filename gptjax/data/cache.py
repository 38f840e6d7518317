"""The token cache: a config's text, tokenized once, memory-mapped by every later run.

Ids go to a raw `uint16`/`uint32` file under `cache_dir()/tokens`, keyed by a
fingerprint of (source files, split, tokenizer); a trained tokenizer is kept
under `cache_dir()/tokenizers`, keyed by (source files, tokenizer settings).
`prepare()` writes nothing else: saving the tokenizer in a workdir is the
caller's step, taken once its own checks have passed.
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

import numpy as np

from gptjax import tokenizers as tok_lib
from gptjax.data import sources
from gptjax.errors import UserError
from gptjax.runtime import cache_dir

CACHE_VERSION = 1  # bump when the token files' meaning changes


@dataclasses.dataclass
class Prepared:
    tokenizer: tok_lib.Tokenizer
    train_ids: np.ndarray  # memory-mapped uint16/uint32
    val_ids: np.ndarray
    stats: dict  # split -> {"tokens", "chars", "bytes", "docs", "dtype"}
    source: sources.Source
    data_id: dict  # what the tokenizer was built for: {"source": ..., "tokenizer": ...}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def source_key(source: sources.Source) -> str:
    """The source's identity plus the size and mtime of every local file."""
    return _digest([CACHE_VERSION, source.identity(), source.file_stats()])


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _encode_rows(batch, tokenizer, sep, num_threads=1):
    texts = batch["text"]
    ids = tokenizer.encode_batch(texts, num_threads=num_threads)
    if sep is not None:
        ids = [np.concatenate([a, sep]) for a in ids]
    return {"ids": ids, "chars": [len(t) for t in texts], "bytes": [len(t.encode("utf-8")) for t in texts]}


def write_tokens(rows, tokenizer, docs: bool, path: str, num_proc: int, desc: str) -> dict:
    """Tokenize rows into `path` (raw ids) and `path`.json (counts); temp names, then rename."""
    datasets = sources.quiet_datasets()
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


def check_same_data(kept_tokenizer: str, kept_data_id: dict | None, data_id: dict) -> None:
    """Refuse to resume on data that the kept tokenizer would not have been built for."""
    if kept_data_id is None:  # saved before runs recorded their data
        return
    now = json.loads(json.dumps(data_id))  # tuples -> lists, as the saved copy holds them
    if kept_data_id == now:
        return
    diff = [k for k in ("source", "tokenizer") if kept_data_id.get(k) != now[k]]
    raise UserError(
        f"the run that saved {kept_tokenizer} was trained with a different data {' and '.join(diff)} "
        f"(saved: {json.dumps({k: kept_data_id.get(k) for k in diff}, sort_keys=True)}), so this run would "
        "tokenize differently; use a new --workdir, or the data settings of the original run."
    )


def prepare(cfg, kept_tokenizer: str | None = None, kept_data_id: dict | None = None, log=print,
            tokenizer: tok_lib.Tokenizer | None = None) -> Prepared:
    """The tokenizer and memory-mapped token arrays of `cfg.data`.

    `kept_tokenizer`: the tokenizer folder of a run that must keep it (one with
    checkpoints), reused as it is once `kept_data_id`, what it was built for,
    matches this config's data. Without it, `tokenizer` is used when given (a
    fine-tune keeps its model's tokenizer), else it comes from the cache or is
    built. Only the cache is written; the caller saves `tokenizer` and
    `data_id` (workdir.save_tokenizer) after its own checks.
    """
    d = cfg.data
    source = sources.resolve_source(d)
    spec = tok_lib.tokenizer_spec(d)
    src_key = source_key(source)
    data_id = {"source": source.identity(), "tokenizer": spec}
    rows = {}

    def load():
        if not rows:
            log(f"data: loading {source.label}")
            rows["train"], rows["val"], rows["docs"] = sources.load_rows(source)
        return rows["train"], rows["val"], rows["docs"]

    if kept_tokenizer:
        check_same_data(kept_tokenizer, kept_data_id, data_id)
        tokenizer = tok_lib.load_tokenizer(kept_tokenizer)
    elif tokenizer is None:
        cached = os.path.join(cache_dir(), "tokenizers", _digest([src_key, spec]))
        tokenizer = _cached_or_built_tokenizer(d, spec, cached, load, log)

    ids, stats = {}, {}
    for split in ("train", "val"):
        path = os.path.join(cache_dir(), "tokens", _digest([src_key, split, tokenizer.fingerprint()]) + ".bin")
        hit = read_tokens(path)
        if hit is None:
            train_rows, val_rows, docs = load()
            write_tokens(train_rows if split == "train" else val_rows, tokenizer, docs, path, d.num_proc,
                         desc=f"tokenizing {split}")
            hit = read_tokens(path)
        ids[split], stats[split] = hit
        if stats[split]["tokens"] == 0:
            raise UserError(f"the {split} split of {source.label} has no text.")
    return Prepared(tokenizer, ids["train"], ids["val"], stats, source, data_id)


def _cached_or_built_tokenizer(d, spec: dict, cached: str, load, log) -> tok_lib.Tokenizer:
    """A tokenizer trained on this source before comes from the cache; any other is built (and cached)."""
    trained = tok_lib.is_trained(spec)
    if trained and tok_lib.is_saved(cached):
        return tok_lib.load_tokenizer(cached)
    t0 = time.perf_counter()
    if trained:
        train_rows, val_rows, docs = load()
        tokenizer = tok_lib.build_tokenizer(d, sources.iter_texts(train_rows), sources.iter_texts(val_rows), docs)
    else:  # GPT-2 or a given .model file: no text needed
        tokenizer = tok_lib.build_tokenizer(d, (), (), docs=False)
    if spec["kind"] != "gpt2":
        log(f"data: built the {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids) "
            f"in {time.perf_counter() - t0:.1f}s")
    if trained:
        tmp = f"{cached}.tmp{os.getpid()}"
        tokenizer.save(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    return tokenizer
