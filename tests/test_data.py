import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config, shared_data_dir
from gptjax import data as data_lib
from gptjax.errors import UserError


def test_batch_is_pure_function_of_seed_and_step():
    ids = np.arange(1000, dtype=np.int32)
    x1, y1 = data_lib.get_batch(ids, 16, 8, seed=3, step=41)
    x2, y2 = data_lib.get_batch(ids, 16, 8, seed=3, step=41)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    x3, _ = data_lib.get_batch(ids, 16, 8, seed=3, step=42)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (8, 16) and x1.dtype == np.int32


def test_batch_at_step_k_is_the_same_in_a_fresh_process():
    ids = np.random.default_rng(0).integers(0, 60, 5000).astype(np.int32)
    here, _ = data_lib.get_batch(ids, 32, 4, seed=1337, step=123)
    code = (
        "import numpy as np; from gptjax import data as d;"
        "ids=np.random.default_rng(0).integers(0,60,5000).astype(np.int32);"
        "x,_=d.get_batch(ids,32,4,seed=1337,step=123); print(x.tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert bytes.fromhex(out.stdout.strip()) == here.tobytes()


def test_windows_cover_the_last_token():
    ids = np.arange(20, dtype=np.int32)
    seen = set()
    for step in range(200):
        x, y = data_lib.get_batch(ids, 4, 4, seed=0, step=step)
        seen.update(y.ravel().tolist())
    assert max(seen) == 19 and min(seen) == 1


def test_split_is_first_90_percent_then_last_10():
    train, val = data_lib.split_text("a" * 90 + "b" * 10, 0.1)
    assert train == "a" * 90 and val == "b" * 10


def test_missing_empty_and_binary_files_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data_lib.read_text_file(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        data_lib.read_text_file(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UserError, match="not UTF-8"):
        data_lib.read_text_file(str(tmp_path / "bin.txt"))


def test_too_short_split_names_block_size():
    with pytest.raises(UserError, match="block_size"):
        data_lib.check_length(np.zeros(10, np.int32), 16, "validation")


def test_offline_without_data_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data_lib.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data_lib, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens
    with pytest.raises(UserError, match="GPTJAX_DATA_DIR"):
        data_lib.tinyshakespeare_path()


def test_download_is_verified_and_cached(tmp_path, monkeypatch):
    src = tmp_path / "src.txt"
    src.write_text("hello")
    import hashlib

    good = hashlib.sha256(b"hello").hexdigest()
    dest = tmp_path / "cache" / "f.txt"
    assert data_lib.download_verified(src.as_uri(), str(dest), good, "") == str(dest)
    assert dest.read_text() == "hello"
    with pytest.raises(UserError, match="sha256"):
        data_lib.download_verified(src.as_uri(), str(tmp_path / "cache" / "g.txt"), "0" * 64, "")
    assert not (tmp_path / "cache" / "g.txt").exists()


@pytest.mark.skipif(shared_data_dir() is None, reason="GPTJAX_DATA_DIR is not set to the shared data folder")
def test_tinyshakespeare_is_read_from_the_data_dir():
    path = data_lib.tinyshakespeare_path()
    assert path.startswith(os.environ["GPTJAX_DATA_DIR"])
    text = data_lib.read_text_file(path)
    assert text.startswith("First Citizen:") and len(text) == 1115394


# ----------------------------------------------------------------------------- sources, tokenizers, the token cache

import json
import math

from conftest import run_cli, small_config
from gptjax.tokenizers import EOT

STORIES = [
    "Tom had a red ball. He threw it to his dog, and the dog ran after it.",
    "Mia found a shell on the beach.\nShe put it in her pocket and smiled.",
    "The cat sat on the mat. It was warm and sleepy in the sun.",
    "Ben built a tall tower of blocks. It fell, and he laughed and built it again.",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private token/tokenizer cache for each test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gptjax"


def data_config(path, workdir=None, **data):
    c = small_config(str(path), workdir or "unused")
    for k, v in data.items():
        c.data[k] = v
    return c


def write_folder(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(t * 8, encoding="utf-8")
    return folder


def cached_token_files(cache):
    d = cache / "tokens"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_local_files_load_through_datasets(tmp_path):
    folder = write_folder(tmp_path / "txt", STORIES[:2])
    (folder / "more.txt").write_text(f"{STORIES[2]}\n{EOT}\n{STORIES[3]}\n{EOT}\n", encoding="utf-8")
    rows = data_lib.load_files(data_lib.resolve_files(str(folder)))
    assert sorted(rows["text"]) == sorted([STORIES[0] * 8, STORIES[1] * 8, STORIES[2], STORIES[3]])

    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in enumerate(STORIES)))
    assert data_lib.load_files((str(jsonl),), text_field="body")["text"] == STORIES

    blob = tmp_path / "tiny-stories.json"  # one object holding a list of texts
    blob.write_text(json.dumps({"texts": STORIES}))
    assert data_lib.load_files((str(blob),), text_field="texts")["text"] == STORIES

    import datasets

    parquet = tmp_path / "p" / "part-0.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_dict({"content": STORIES}).to_parquet(str(parquet))
    files = data_lib.resolve_files(str(tmp_path / "p" / "*.parquet"))
    assert data_lib.load_files(files, text_field="content")["text"] == STORIES


def test_bad_sources_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no .txt, .json, .jsonl, .parquet files"):
        data_lib.resolve_files(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="is empty"):
        data_lib.load_files((str(tmp_path / "blank.txt"),))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text"):
        data_lib.load_files((str(tmp_path / "latin1.txt"),))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"title": "a", "body": "b"}\n')
    with pytest.raises(UserError, match=r"no field 'text'; its fields are \['title', 'body'\]"):
        data_lib.load_files((str(jsonl),))
    with pytest.raises(UserError, match=r"unknown dataset 'tinystorys'; known: tinyshakespeare, tinystories"):
        data_lib.resolve_source(data_config("", dataset="tinystorys").data)
    with pytest.raises(UserError, match="pattern .* matches no files"):
        data_lib.resolve_files(str(tmp_path / "nothing-*.txt"))


def test_documents_are_separated_by_end_of_text(tmp_path, cache):
    folder = write_folder(tmp_path / "docs", STORIES)
    cfg = data_config(folder, tokenizer="sentencepiece", vocab_size=300, val_fraction=0.25)
    p = data_lib.prepare(cfg, None, log=lambda *_: None)
    eot = p.tokenizer.eot_id
    assert p.tokenizer.decode([eot]) == EOT
    for ids, n_docs in ((p.train_ids, 3), (p.val_ids, 1)):  # 4 files: 3 train, 1 validation
        ids = np.asarray(ids)
        assert ids[-1] == eot and int((ids == eot).sum()) == n_docs
        docs = [p.tokenizer.decode(part) for part in np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]]
        assert all(d.endswith(EOT) and d[: -len(EOT)] in [s * 8 for s in STORIES] for d in docs)


def test_token_cache_is_reused_and_invalidated(tmp_path, cache, monkeypatch):
    folder = write_folder(tmp_path / "docs", STORIES)
    cfg = data_config(folder, tokenizer="sentencepiece", vocab_size=300)
    first = data_lib.prepare(cfg, None, log=lambda *_: None)
    assert first.train_ids.dtype == np.uint16 and isinstance(first.train_ids, np.memmap)
    files = cached_token_files(cache)
    assert len(files) == 4  # train and val: ids + counts

    real_load_rows = data_lib.load_rows
    monkeypatch.setattr(data_lib, "load_rows", lambda s: pytest.fail("the cache should have been used"))
    again = data_lib.prepare(cfg, None, log=lambda *_: None)
    np.testing.assert_array_equal(again.train_ids, first.train_ids)
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    monkeypatch.setattr(data_lib, "load_rows", real_load_rows)

    cfg.data.vocab_size = 310  # another tokenizer: new token files
    data_lib.prepare(cfg, None, log=lambda *_: None)
    assert len(cached_token_files(cache)) == 8
    (folder / "doc0.txt").write_text("A new first story about a frog.\n" * 8)  # the source changed
    changed = data_lib.prepare(cfg, None, log=lambda *_: None)
    assert len(cached_token_files(cache)) == 12
    assert "frog" in changed.tokenizer.decode(np.concatenate([changed.train_ids, changed.val_ids]))


def test_streamed_rows_tokenize_like_downloaded_rows(tmp_path):
    import datasets

    from gptjax.tokenizers import CharTokenizer

    tok = CharTokenizer.from_text("".join(STORIES) + "\n")
    rows = datasets.Dataset.from_dict({"text": STORIES})
    a = data_lib.write_tokens(rows, tok, True, str(tmp_path / "a.bin"), 1, "a")
    b = data_lib.write_tokens(rows.to_iterable_dataset(), tok, True, str(tmp_path / "b.bin"), 1, "b")
    assert a == b and a["docs"] == 4 and a["bytes"] == sum(len(s.encode()) for s in STORIES)
    ids, _ = data_lib.read_tokens(str(tmp_path / "b.bin"))
    assert tok.decode(ids) == "".join(s + "\n\n" for s in STORIES)  # char: a blank line between documents


def test_failed_tokenization_leaves_nothing_in_the_cache(tmp_path, cache, monkeypatch):
    folder = write_folder(tmp_path / "docs", STORIES)

    def broken(batch, **_):
        raise UserError("tokenizer broke")

    monkeypatch.setattr(data_lib, "_encode_rows", broken)
    with pytest.raises(UserError, match="tokenizer broke"):
        data_lib.prepare(data_config(folder), None, log=lambda *_: None)
    assert cached_token_files(cache) == []


def test_resume_on_different_data_is_refused(tmp_path, cache, text_file):
    workdir = tmp_path / "run"
    data_lib.prepare(data_config(text_file, tokenizer="sentencepiece", vocab_size=300), str(workdir),
                     log=lambda *_: None)  # no checkpoint yet: the tokenizer is simply rebuilt
    data_lib.prepare(data_config(text_file), str(workdir), log=lambda *_: None)
    (workdir / "checkpoints" / "10").mkdir(parents=True)  # a run to resume now exists
    data_lib.prepare(data_config(text_file), str(workdir), log=lambda *_: None)  # same data: fine
    with pytest.raises(UserError, match="different data tokenizer .* would tokenize differently"):
        data_lib.prepare(data_config(text_file, tokenizer="sentencepiece", vocab_size=300), str(workdir))
    other = tmp_path / "other.txt"
    other.write_text(open(text_file).read())
    with pytest.raises(UserError, match="different data source"):
        data_lib.prepare(data_config(other), str(workdir))


def test_bits_per_byte_by_hand():
    from gptjax.eval import bits_per_byte

    # One nat per token is 1/ln2 bits; 4 tokens spelling 2 bytes: 2/ln2 bits per byte.
    assert bits_per_byte(1.0, 4, 2) == pytest.approx(2 / math.log(2))
    # A char model of "héllo": 5 tokens, 6 UTF-8 bytes, loss ln 2 (one bit) per token -> 5/6 bits per byte.
    assert bits_per_byte(math.log(2), 5, len("héllo".encode())) == pytest.approx(5 / 6)


def test_evaluate_reports_perplexity_and_bits_per_byte(tmp_path, cache):
    from gptjax.train import Run

    text = tmp_path / "t.txt"
    text.write_text("naïve café, déjà vu; el niño.\n" * 60, encoding="utf-8")
    cfg = small_config(str(text), tmp_path / "run", **{"train.eval_full": True, "train.steps": 1})
    run = Run(cfg, str(tmp_path / "run"), quiet=True)
    run.state["step"] = run.state["step"] + 1  # the last step: include the full pass
    ev = run.evaluate()
    t = cfg.train
    n_bytes = sum(len(run.tokenizer.decode(y).encode()) for i in range(t.eval_steps)
                  for y in data_lib.get_batch(run.val_ids, 16, t.batch_size, t.seed, i, data_lib.EVAL_VAL_STREAM)[1])
    n_tokens = t.eval_steps * t.batch_size * 16
    assert n_bytes > n_tokens  # accented letters are two bytes
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] * n_tokens / (math.log(2) * n_bytes), rel=1e-6)
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]), rel=1e-6)
    n_windows = (len(run.val_ids) - 1) // 16
    assert ev["val_full_tokens"] == n_windows * 16
    full_bytes = len(run.tokenizer.decode(np.asarray(run.val_ids[1:n_windows * 16 + 1])).encode())
    assert ev["val_full_bpb"] == pytest.approx(ev["val_full_loss"] * n_windows * 16 / (math.log(2) * full_bytes),
                                               rel=1e-6)
    assert abs(ev["val_full_loss"] - ev["val_loss"]) < 0.1  # an untrained model: both near ln(vocab)


@pytest.mark.skipif(shared_data_dir() is None, reason="GPTJAX_DATA_DIR is not set to the shared data folder")
def test_named_datasets_use_the_local_copies(cache):
    p = data_lib.prepare(load_config("tiny"), None, log=lambda *_: None)  # Tiny Shakespeare keeps its 65 characters
    assert p.tokenizer.vocab_size == 65 and len(p.train_ids) == 1003854 and len(p.val_ids) == 111540
    for name, folder, val in (("tinystories", "tinystories", "valid.txt"), ("wikitext2", "wikitext-2", "valid.txt")):
        src = data_lib.resolve_source(data_config("", dataset=name).data)
        assert src.train_files == (os.path.join(os.environ["GPTJAX_DATA_DIR"], folder, "train.txt"),)
        assert src.val_files == (os.path.join(os.environ["GPTJAX_DATA_DIR"], folder, val),)
    _, val, docs = data_lib.load_rows(src)  # WikiText: one row per line, lines kept
    assert not docs and "".join(val["text"]) == open(src.val_files[0], encoding="utf-8").read()


def test_configs_have_the_documented_sizes():
    import importlib

    from flax import nnx

    from gptjax import model as model_lib

    expected = {("shakespeare", None): 10_745_088, ("shakespeare", "bpe"): 3_640_080,
                ("tinystories", "tiny"): 1_066_112, ("tinystories", "small"): 6_349_568,
                ("tinystories", "medium"): 53_138_304, ("tinystories", "gpt2"): 124_337_664,
                ("wikitext", "tiny"): 1_328_256, ("wikitext", "small"): 21_472_128,
                ("openwebtext", "small"): 30_117_120}
    vocab = {"char": None, "gpt2": 50257}
    for (name, size), n in expected.items():
        c = load_config(name, size)
        # char vocabularies: Tiny Shakespeare's 65 characters; the local TinyStories' 81 and a newline
        c.model.vocab_size = vocab.get(c.data.tokenizer, c.data.vocab_size) or (65 if name == "shakespeare" else 82)
        abstract = nnx.eval_shape(lambda: model_lib.GPT(c.model, rngs=nnx.Rngs(0)))
        assert model_lib.count_params(nnx.to_pure_dict(nnx.state(abstract))) == n, (name, size)
    with pytest.raises(ValueError, match="sizes: tiny, small"):
        load_config("tinystories", "huge")


# ----------------------------------------------------------------------------- command lines

CLI_MODEL = ["--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
             "--config.model.block_size=16", "--config.train.batch_size=4", "--config.train.steps=6",
             "--config.train.eval_every=6", "--config.train.eval_steps=2", "--config.train.warmup_steps=1"]


def test_text_runs_on_a_folder_and_on_jsonl_with_a_custom_field(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    folder = write_folder(tmp_path / "mytexts", STORIES)
    proc = run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={tmp_path / 'a'}", *CLI_MODEL,
                   "--config.data.dataset=text", f"--config.data.path={folder}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "step      6 | eval" in proc.stdout
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"story": s * 4, "n": i}) + "\n" for i, s in enumerate(STORIES * 3)))
    proc = run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={tmp_path / 'b'}", *CLI_MODEL,
                   "--config.data.dataset=text", f"--config.data.path={jsonl}", "--config.data.text_field=story",
                   "--config.data.tokenizer=sentencepiece", "--config.data.vocab_size=300", env=env)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r and "val_ppl" in r for r in records)
    out = run_cli("gptjax.sample", f"--workdir={tmp_path / 'b'}", "--prompt=Tom", "--max_new_tokens=5", env=env)
    assert out.returncode == 0 and out.stdout.startswith("Tom"), out.stderr


def test_data_cli_prints_counts_and_a_hub_name_offline_is_clear(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    folder = write_folder(tmp_path / "mytexts", STORIES)
    proc = run_cli("gptjax.data", "--config", "configs/tiny.py", "--config.data.dataset=text",
                   f"--config.data.path={folder}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "characters/token" in proc.stdout and "train:" in proc.stdout
    offline = {**env, "GPTJAX_DATA_DIR": str(tmp_path / "nothing-here"), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli("gptjax.data", "--config", "configs/tinystories.py", env=offline)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "roneneldan/TinyStories" in proc.stderr and "GPTJAX_DATA_DIR" in proc.stderr
    assert "data.path" in proc.stderr
