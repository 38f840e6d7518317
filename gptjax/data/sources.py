"""Where text comes from: verified downloads, `Source`, and loading rows with `datasets`.

A source gives train and validation documents, loaded with Hugging Face
`datasets` from local files or the hub. Named datasets use the local copies
under `$GPTJAX_DATA_DIR` when they are there, and download otherwise.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import os
import sys
import urllib.error
import urllib.request

from gptjax.errors import UserError
from gptjax.runtime import DATA_DIR_ENV, cache_dir, data_file
from gptjax.tokenizers import EOT

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

TEXT_EXTS = (".txt",)
JSON_EXTS = (".json", ".jsonl")
PARQUET_EXTS = (".parquet",)
FILE_EXTS = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS
VAL_SPLIT_SEED = 2357  # rows cut out for validation, where a source has no validation split
STREAM_VAL_DOCS = 1000  # validation documents taken off the front of a streamed train split


# ----------------------------------------------------------------------------- downloads

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
    local = data_file("tinyshakespeare", "input.txt")
    if local:
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


# ----------------------------------------------------------------------------- sources

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

    def file_stats(self) -> list:
        """(path, size, mtime) of every local file: changes when a file does."""
        return [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.train_files + self.val_files]


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


def _local_pair(folder: str, val_name: str = "valid.txt") -> tuple | None:
    train, val = data_file(folder, "train.txt"), data_file(folder, val_name)
    return (train, val) if train and val else None


def resolve_source(d) -> Source:
    """The Source for a config's `data` section (validated; cheap: nothing is read yet)."""
    field, frac = d.text_field, d.val_fraction
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
    assert d.dataset == "openwebtext", d.dataset  # config.validate admits only config.DATASETS
    local = data_file("openwebtext")
    if local:
        return Source("openwebtext (local)", train_files=resolve_files(local), text_field=field, val_fraction=frac)
    return Source("openwebtext", hf_name="Skylion007/openwebtext", val_fraction=frac, streaming=d.streaming)


# ----------------------------------------------------------------------------- loading rows with `datasets`

def quiet_datasets():
    """The `datasets` module, logging errors only, and with no progress bars unless a person watches
    a terminal: a run's log holds our own lines, not "Generating train split" or "Map" bars."""
    import datasets

    datasets.logging.set_verbosity_error()
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        datasets.disable_progress_bars()
    return datasets


def _offline_hint() -> str:
    return (f"Offline? Set {DATA_DIR_ENV} to a folder with local copies (see README 'Datasets and tokenizers') "
            "or point --config.data.path at local files.")


def _text_column(ds, field: str, where: str):
    """Keep one string column, named `text`; a column of string lists becomes one row per string."""
    datasets = quiet_datasets()
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
        if EOT in text:
            out.extend(part.strip("\n") for part in text.split(EOT))
        else:
            out.append(text)
    return {"text": [t for t in out if t.strip()]}


def load_files(files, text_field: str = "text", by_line: bool = False):
    """A `datasets.Dataset` of documents (or lines, by_line) with one column `text`."""
    datasets = quiet_datasets()
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
    datasets = quiet_datasets()
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


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    n = int(len(text) * (1.0 - val_fraction))
    return text[:n], text[n:]


def load_rows(source: Source):
    """(train_rows, val_rows, docs): `datasets` objects with a `text` column.

    docs is True when rows are separate documents (an end-of-text token goes
    after each); a single text is split by characters (data.val_fraction),
    as nanoGPT splits Tiny Shakespeare.
    """
    datasets = quiet_datasets()
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
    """The `text` of every row, in order (works for downloaded and streamed rows)."""
    for batch in rows.iter(batch_size=batch_size):
        yield from batch["text"]
