"""`gptjax.sample`: the Generator API, streaming (exact, no recompiles, bounded memory), the CLI."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, run_cli
from gptjax import sample as sample_lib
from gptjax.errors import UserError


# ----------------------------------------------------------------------------- ids -> text, piece by piece

class ByteTokenizer:
    """Ids are UTF-8 bytes: a character may span several ids, as with GPT-2's BPE."""

    vocab_size, eot_id = 256, None

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class WordTokenizer:
    """Sentencepiece's rule: "▁" is a space, except at the start of the decoded text."""

    WORDS = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", ".", "<eot>"]
    vocab_size, eot_id = len(WORDS), len(WORDS) - 1

    def decode(self, ids):
        return "".join(self.WORDS[int(i)] for i in ids).replace("▁", " ").removeprefix(" ")


def streamed(tokenizer, ids, stop=None, chunk=1):
    ts = sample_lib.TextStream(tokenizer, stop)
    pieces, longest = [], 0
    for i in range(0, len(ids), chunk):
        pieces.append(ts.push(ids[i:i + chunk], last=i + chunk >= len(ids)))
        longest = max(longest, len(ts.ids))
        if ts.finished:
            break
    return "".join(pieces), longest


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_text_stream_pieces_join_to_the_whole_text_in_bounded_work(chunk):
    text = "héllo wörld, 3 € and 🙂. " * 40
    ids = ByteTokenizer().encode(text)
    got, longest = streamed(ByteTokenizer(), ids, chunk=chunk)
    assert got == text
    assert longest <= 2 * sample_lib.TextStream.CONTEXT + chunk + 4  # old ids are forgotten
    stop = "3 €"
    cut, _ = streamed(ByteTokenizer(), ids, stop=stop, chunk=chunk)
    assert cut == text[: text.index(stop)]


def test_text_stream_keeps_sentencepiece_spaces_and_stops_at_end_of_text():
    tok = WordTokenizer()
    ids = [0, 1, 2, 3, 0, 4, 5] * 20 + [6, 0, 1]
    got, _ = streamed(tok, ids, chunk=4)
    assert got == tok.decode(ids[: ids.index(6)])


# ----------------------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def gen(trained_workdir):
    return sample_lib.Generator.from_workdir(trained_workdir)


@pytest.mark.slow  # 600-token generations, several chunk sizes
def test_api_generates_past_block_size_and_streams_the_same_text(gen):
    g = gen
    text = g.generate("First", max_new_tokens=40, seed=3)  # block_size is 16
    assert text.startswith("First") and len(text) == len("First") + 40
    assert "".join(g.stream("First", max_new_tokens=40, seed=3, chunk_size=7)) == text
    texts = g.samples("All", num_samples=3, max_new_tokens=20, seed=1)
    assert len(texts) == 3 and all(t.startswith("All") and len(t) == 23 for t in texts)
    long = g.samples("All", num_samples=2, max_new_tokens=600, seed=1)  # several chunks of the batched path
    assert [len(t) for t in long] == [603, 603]
    assert long[0] == "".join(g.stream("All", max_new_tokens=600, seed=1, chunk_size=50))


def test_stop_string_ends_the_text_before_it(gen):
    g = gen
    free = g.generate("First", max_new_tokens=60, temperature=0)
    stop = free[len("First") + 3: len("First") + 5]  # a string the greedy text will produce
    cut = g.generate("First", max_new_tokens=60, temperature=0, stop=stop)
    assert cut == free[: free.index(stop, len("First"))]
    assert "".join(g.stream("First", max_new_tokens=60, temperature=0, stop=stop, chunk_size=4)) == cut


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 10**10}, "max_new_tokens=10,000,000,000 cannot fit"),
])
def test_bad_sampling_settings_are_one_clear_error(gen, kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        gen.generate("First", **kwargs)


def test_a_batch_that_cannot_fit_in_memory_is_refused_up_front(gen):
    with pytest.raises(UserError, match="would hold about .* GiB of text in memory"):
        gen.samples("First", num_samples=10**4, max_new_tokens=10**9)


def test_top_k_above_the_vocabulary_is_clamped_with_a_warning(gen):
    g = gen
    vocab = g.tokenizer.vocab_size
    with pytest.warns(UserWarning, match=f"using top_k={vocab}"):
        a = g.generate("First", max_new_tokens=10, top_k=vocab + 100)
    assert a == g.generate("First", max_new_tokens=10, top_k=0)


class CompileLog(logging.Handler):
    """Counts the programs JAX compiles while `jax.log_compiles()` is on."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.names.append(msg.split(" with ")[0])


def test_a_stream_compiles_nothing_after_its_first_chunk(gen):
    log = CompileLog()
    logging.getLogger("jax").addHandler(log)
    try:
        with jax.log_compiles():
            pieces = gen.stream("First", max_new_tokens=300, seed=11, chunk_size=16)
            shown = next(pieces) + next(pieces)  # the prompt, then the first chunk's text
            first = list(log.names)
            shown += "".join(pieces)
    finally:
        logging.getLogger("jax").removeHandler(log)
    assert len(shown) == len("First") + 300
    assert log.names == first, log.names[len(first):]
    assert any("advance" in n for n in first)  # the counter does see compiles


# ----------------------------------------------------------------------------- memory, in a fresh process

PEAK_SCRIPT = """
import json, resource, sys
from gptjax.sample import Generator
g = Generator.from_workdir(sys.argv[1])
mode, short, long = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def run(n):
    if mode == "stream":
        made = sum(len(p) for p in g.stream("First", max_new_tokens=n, seed=0, chunk_size=16))
    else:
        made = sum(len(t) for t in g.samples("First", num_samples=int(mode), max_new_tokens=n, seed=0))
    return made, peak()
print(json.dumps([run(short), run(long)]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode, short, long", [("stream", 1000, 8000), ("1", 200, 20000), ("2", 200, 20000)])
def test_peak_memory_does_not_grow_with_the_number_of_new_tokens(trained_workdir, mode, short, long):
    """Peak RSS after a long generation stays within 50 MB of the peak after a short one."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, trained_workdir, mode, str(short), str(long)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (made_short, peak_short), (made_long, peak_long) = json.loads(proc.stdout.splitlines()[-1])
    n = 1 if mode == "stream" else int(mode)
    assert made_long - made_short == n * (long - short)
    assert peak_long - peak_short < 50 * 2**20, (peak_short / 2**20, peak_long / 2**20)


# ----------------------------------------------------------------------------- the command line

def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flag, needle", [
    ("--top_p=1.01", "--top_p must be in (0, 1]"),
    ("--step=7", "no checkpoint at step 7"),
])
def test_cli_bad_input_is_one_clean_error(trained_workdir, flag, needle):
    proc = run_cli("gptjax.sample", f"--workdir={trained_workdir}", flag)
    assert_clean_error(proc, needle)
    if flag == "--step=7":
        assert "steps with checkpoints: [" in proc.stderr and "50, 60]" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags, needle", [
    (["--max_new_tokens=10000000000"], "--max_new_tokens=10,000,000,000 cannot fit"),
    (["--max_new_tokens=1000000000", "--num_samples=10000"], "GiB of text in memory"),
])
def test_cli_request_that_cannot_fit_is_one_error_line_before_loading(tmp_path, flags, needle):
    # A workdir that does not exist: the request is refused before anything is read or allocated.
    proc = run_cli("gptjax.sample", f"--workdir={tmp_path / 'none'}", *flags)
    assert_clean_error(proc, needle)
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr


@pytest.mark.slow
def test_cli_streams_stops_writes_output_and_quantizes(trained_workdir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("First Citizen:\n", encoding="utf-8")
    out, qdir = tmp_path / "out.txt", tmp_path / "int8"
    proc = run_cli("gptjax.sample", f"--workdir={trained_workdir}", f"--prompt_file={prompt}",
                   "--max_new_tokens=50", "--temperature=0", "--stop=\n\n", f"--output={out}", "--quantize=int8",
                   f"--save_quantized={qdir}", "--top_k=1000")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --top_k=1000 is larger than the vocabulary" in proc.stderr
    assert "int8: parameters" in proc.stderr
    written = out.read_text(encoding="utf-8")
    assert proc.stdout == written and written.startswith("First Citizen:\n")
    assert "\n\n" not in written[len("First Citizen:\n"):-1]
    # the saved int8 folder samples like a workdir and gives the same text
    again = run_cli("gptjax.sample", f"--workdir={qdir}", f"--prompt_file={prompt}", "--max_new_tokens=50",
                    "--temperature=0", "--stop=\n\n")
    assert again.returncode == 0, again.stderr
    assert again.stdout == written


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_the_text_and_exits_130(trained_workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.sample", f"--workdir={trained_workdir}",
                             "--prompt=First", "--max_new_tokens=100000000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        shown = b""
        deadline = time.monotonic() + 240
        while len(shown) < 200 and time.monotonic() < deadline:  # the stream is under way
            shown += os.read(proc.stdout.fileno(), 4096)
        assert len(shown) >= 200, shown
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out, err = (shown + rest).decode("utf-8"), err.decode("utf-8")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert out.startswith("First") and out.endswith("\n") and len(out) > 200
