"""`python -m gptjax.sample --workdir DIR --prompt "ROMEO:"`, and the `Generator` Python API.

Restores a checkpoint and the tokenizer from a workdir (`workdir.load_run`)
and generates text with `decode`'s compiled state machine, in chunks: the
device holds one chunk at a time, the text gathers on the host, and a stream
prints each chunk as it comes. One compiled chunk serves a text of any length.

Notebook use:

    from gptjax.sample import Generator
    g = Generator.from_workdir("runs/tiny")
    print(g.generate("ROMEO:", max_new_tokens=200))
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Iterator

import jax
import numpy as np
from absl import app, flags, logging

from gptjax import config as config_lib
from gptjax import decode
from gptjax import quantize as quantize_lib
from gptjax.errors import UserError, exit_with
from gptjax.workdir import LoadedRun, load_run, save_quantized

DEFAULT_TOP_K = 200
SAMPLES_CHUNK = 256  # tokens per compiled call of the batched path
# Host memory per new token of each sample while a batch's texts are gathered:
# its int32 id, one copy when the chunks are joined, and the decoded text.
HELD_BYTES_PER_TOKEN = 16


# ----------------------------------------------------------------------------- checking inputs

def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int, num_samples: int = 1,
                   prefix: str = "") -> None:
    """One UserError naming the first bad setting and its valid range."""
    if not temperature >= 0:
        raise UserError(f"{prefix}temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k < 0:
        raise UserError(f"{prefix}top_k must be >= 0 (0 = no limit), got {top_k}.")
    if not 0 < top_p <= 1:
        raise UserError(f"{prefix}top_p must be in (0, 1] (1 = no nucleus cut), got {top_p}.")
    if max_new_tokens < 1:
        raise UserError(f"{prefix}max_new_tokens must be >= 1, got {max_new_tokens}.")
    if max_new_tokens > decode.MAX_NEW_TOKENS:
        raise UserError(f"{prefix}max_new_tokens={max_new_tokens:,} cannot fit: a sample has at most "
                        f"{decode.MAX_NEW_TOKENS:,} new tokens (positions are 32-bit integers); ask for fewer.")
    if num_samples < 1:
        raise UserError(f"{prefix}num_samples must be >= 1, got {num_samples}.")


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not every platform says
        return float("inf")


def check_fits_in_memory(max_new_tokens: int, num_samples: int, prefix: str = "") -> None:
    """Texts kept whole until the end (a batch, or a stream written to a file) must fit in memory."""
    need = HELD_BYTES_PER_TOKEN * max_new_tokens * num_samples
    have = _memory_bytes()
    if need > have:
        raise UserError(
            f"{num_samples} sample(s) of {prefix}max_new_tokens={max_new_tokens:,} would hold about "
            f"{need / 2**30:,.1f} GiB of text in memory, more than this machine's {have / 2**30:,.1f} GiB; "
            f"ask for fewer tokens or samples, or stream one sample ({prefix}num_samples=1, no file output).")


def clamp_top_k(top_k: int, vocab_size: int, explicit: bool, prefix: str = "") -> int:
    """top_k above the vocabulary size means every token: clamped, with a warning when asked for."""
    if top_k <= vocab_size:
        return top_k
    if explicit:
        warnings.warn(f"{prefix}top_k={top_k} is larger than the vocabulary ({vocab_size} tokens); "
                      f"using top_k={vocab_size}, i.e. no top-k cut.", stacklevel=3)
    return vocab_size


# ----------------------------------------------------------------------------- ids -> text, piece by piece

class TextStream:
    """The text of a growing id sequence, piece by piece, cut at end-of-text and at the stop string.

    The pieces join to the text of all the ids cut the same way. Only the ids
    since a recent point are decoded again at each push, so a long text costs
    time linear in its length: once the text of the last CONTEXT ids is a
    suffix of the whole decoded text that covers everything not yet given
    out, the ids before them are forgotten.
    """

    CONTEXT = 16  # covers a split multi-byte character and sentencepiece's leading-space rule

    def __init__(self, tokenizer, stop: str | None):
        self.tokenizer = tokenizer
        self.stop = stop or ""
        self.hold = max(0, len(self.stop) - 1)  # a stop string may begin in this piece and end in the next
        self.ids: list[int] = []  # the ids decoded at each push
        self.shown = 0  # characters of decode(self.ids) already given out
        self.finished = False

    def push(self, new_ids, last: bool = False) -> str:
        """The next piece of text after new_ids; last: no more ids will come."""
        new_ids = [int(i) for i in new_ids]
        eot = self.tokenizer.eot_id
        if eot is not None and eot in new_ids:
            new_ids, last = new_ids[: new_ids.index(eot)], True
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(np.asarray(self.ids, np.int32))
        end = len(text)
        at = text.find(self.stop, self.shown) if self.stop else -1
        if at >= 0:
            end, last = at, True
        if not last:
            arrived = len(text) - text.endswith("\ufffd")  # a multi-byte character may still be arriving
            end = arrived - self.hold
        piece = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        self.finished = last
        if not last:
            self._forget(text)
        return piece

    def _forget(self, text: str) -> None:
        if len(self.ids) <= 2 * self.CONTEXT:
            return
        for n in range(self.CONTEXT, self.CONTEXT + 4):  # one of 4 starts is a character boundary (UTF-8)
            kept_text = self.tokenizer.decode(np.asarray(self.ids[-n:], np.int32))
            dropped = len(text) - len(kept_text)
            if text.endswith(kept_text) and dropped <= self.shown and not kept_text.startswith("\ufffd"):
                self.ids, self.shown = self.ids[-n:], self.shown - dropped
                return


# ----------------------------------------------------------------------------- the Python API

class Generator:
    """A restored model and its tokenizer, ready to generate text.

        g = Generator.from_workdir("runs/tiny")            # or quantize="int8"
        text = g.generate("ROMEO:", max_new_tokens=200)   # prompt + continuation
        for piece in g.stream("ROMEO:"): print(piece, end="")
    """

    def __init__(self, run: LoadedRun):
        self.run = run
        self.tokenizer = run.tokenizer
        self.block_size = run.cfg.model.block_size

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, quantize: str = "none") -> "Generator":
        return cls(load_run(workdir, step, quantize))

    def _prepare(self, prompt, num_samples, max_new_tokens, temperature, top_k, top_p, stop, seed):
        explicit = top_k is not None
        top_k = DEFAULT_TOP_K if top_k is None else top_k
        check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples)
        top_k = clamp_top_k(top_k, self.tokenizer.vocab_size, explicit)
        ids = decode.encode_prompt(self.tokenizer, prompt, self.block_size)
        stop_ids = self.tokenizer.encode(stop) if stop else ()
        window, settings = decode.request(ids, num_samples, self.block_size, max_new_tokens, temperature, top_k,
                                          top_p, self.tokenizer.eot_id, stop_ids)
        return window, len(ids), jax.random.key(seed), settings

    def _chunks(self, prepared, max_new_tokens: int, chunk_size: int, use_cache: bool):
        """Yield (new ids [B, k], last) per compiled chunk of up to chunk_size tokens."""
        window, prompt_len, key, settings = prepared
        g = self.run
        n_steps = min(chunk_size, max_new_tokens)
        state = decode.start(g.graphdef, g.params, window, prompt_len, key, settings, use_cache=use_cache)
        made = 0
        while True:
            state, new = decode.advance(g.graphdef, g.params, state, settings, n_steps=n_steps, use_cache=use_cache)
            # Whole arrays to the host: slicing on the device would compile one program per length.
            new, length, done = jax.device_get((new, state["length"], state["done"]))
            k = int(length) - prompt_len - made
            made += k
            last = made >= max_new_tokens or bool(np.all(done))
            yield new[:, :k], last
            if last:
                return

    def _completion(self, ids, stop) -> tuple[str, bool]:
        """Text of generated ids, cut at end-of-text and at the stop string; (text, stopped)."""
        ids = np.asarray(ids)
        eot = self.tokenizer.eot_id
        stopped = False
        if eot is not None and (ids == eot).any():
            ids, stopped = ids[: int(np.argmax(ids == eot))], True
        text = self.tokenizer.decode(ids)
        if stop and stop in text:
            text, stopped = text[: text.index(stop)], True
        return text, stopped

    def samples(self, prompt: str = "\n", num_samples: int = 1, max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = None, top_p: float = 1.0, seed: int = 0,
                stop: str | None = None, use_cache: bool = True) -> list[str]:
        """num_samples continuations of `prompt`, each returned as prompt + continuation.

        top_k=None means the default 200, silently clamped to the vocabulary;
        an explicit top_k above the vocabulary is clamped with a warning.
        """
        prepared = self._prepare(prompt, num_samples, max_new_tokens, temperature, top_k, top_p, stop, seed)
        check_fits_in_memory(max_new_tokens, num_samples)
        chunks = [ids for ids, _ in self._chunks(prepared, max_new_tokens, SAMPLES_CHUNK, use_cache)]
        rows = np.concatenate(chunks, axis=1)
        return [prompt + self._completion(row, stop)[0] for row in rows]

    def generate(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float = 1.0, seed: int = 0, stop: str | None = None,
                 use_cache: bool = True) -> str:
        """One continuation of `prompt`: prompt + generated text."""
        return self.samples(prompt, 1, max_new_tokens, temperature, top_k, top_p, seed, stop, use_cache)[0]

    def stream(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = None, top_p: float = 1.0, seed: int = 0, stop: str | None = None,
               use_cache: bool = True, chunk_size: int = 16) -> Iterator[str]:
        """Yield the prompt, then the generated text piece by piece, chunk_size tokens at a time.

        The pieces join to exactly `generate(...)` with the same arguments;
        nothing of the text is kept here once it is yielded.
        """
        if chunk_size < 1:
            raise UserError(f"chunk_size must be >= 1, got {chunk_size}.")
        prepared = self._prepare(prompt, 1, max_new_tokens, temperature, top_k, top_p, stop, seed)
        yield prompt
        text = TextStream(self.tokenizer, stop)
        for ids, last in self._chunks(prepared, max_new_tokens, chunk_size, use_cache):
            piece = text.push(ids[0], last)
            if piece:
                yield piece
            if text.finished:
                return


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Workdir of a training run (or a --save_quantized folder).")
    flags.DEFINE_string("prompt", None, "Text to continue (default: a newline). \"\" starts from end-of-text.")
    flags.DEFINE_string("prompt_file", None, "Read the prompt from this UTF-8 file instead of --prompt.")
    flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate per sample.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Sample among the k most likely tokens; 0 = all. "
                         "Values above the vocabulary size are clamped to it (with a warning).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with this much "
                       "probability; 1 = all.")
    flags.DEFINE_string("stop", None, "Stop a sample when it produces this string (not included in the output).")
    flags.DEFINE_integer("num_samples", 1, "Independent samples, generated as one batch.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step to load; default: the latest.")
    flags.DEFINE_string("output", None, "Also write the final text to this file.")
    flags.DEFINE_boolean("cache", True, "Decode with the KV cache; --nocache recomputes the window per token.")
    flags.DEFINE_integer("chunk_size", 16, "Tokens per compiled chunk when streaming (--num_samples 1).")
    flags.DEFINE_enum("quantize", "none", list(config_lib.QUANTIZE_SCHEMES), "Weight quantization for sampling.")
    flags.DEFINE_string("save_quantized", None, "With --quantize int8: also save the quantized model to this "
                        "new folder (sample/eval accept it as --workdir).")


def read_prompt(FLAGS) -> str:
    if FLAGS.prompt_file is not None:
        if FLAGS.prompt is not None:
            raise UserError("give --prompt or --prompt_file, not both.")
        if not os.path.isfile(FLAGS.prompt_file):
            raise UserError(f"--prompt_file {FLAGS.prompt_file} does not exist.")
        try:
            with open(FLAGS.prompt_file, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt_file {FLAGS.prompt_file} is not UTF-8 text ({e.reason}).") from None
    return "\n" if FLAGS.prompt is None else FLAGS.prompt


def main(argv):
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # orbax warns that a checkpoint it only reads is read-only
    warnings.simplefilter("always")
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr, flush=True)
    try:
        sample(FLAGS, argv)
    except UserError as e:
        exit_with(e)
    except KeyboardInterrupt:  # Ctrl-C: what was printed stays, and the shell's code for SIGINT
        sys.stdout.write("\n")
        sys.stdout.flush()
        sys.exit(130)


def sample(FLAGS, argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags go as --name=value.")
    if FLAGS.workdir is None:
        raise UserError("--workdir is required: the folder of a training run.")
    check_sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.max_new_tokens, FLAGS.num_samples, "--")
    if FLAGS.num_samples > 1 or FLAGS.output:  # these keep the whole text until the end
        check_fits_in_memory(FLAGS.max_new_tokens, FLAGS.num_samples, "--")
    if FLAGS.chunk_size < 1:
        raise UserError(f"--chunk_size must be >= 1, got {FLAGS.chunk_size}.")
    if FLAGS.save_quantized and FLAGS.quantize == "none":
        raise UserError("--save_quantized needs --quantize int8.")
    prompt = read_prompt(FLAGS)
    gen = Generator.from_workdir(FLAGS.workdir, FLAGS.step, FLAGS.quantize)
    run = gen.run
    if run.quantized != "none":
        print(f"{run.quantized}: {quantize_lib.describe_bytes(run.float_bytes, run.param_bytes)}",
              file=sys.stderr, flush=True)
    if FLAGS.save_quantized:
        save_quantized(run, FLAGS.save_quantized)
        print(f"saved the {run.quantized} model to {FLAGS.save_quantized}", file=sys.stderr, flush=True)
    top_k = clamp_top_k(FLAGS.top_k, gen.tokenizer.vocab_size, FLAGS["top_k"].present, "--")
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=top_k,
              top_p=FLAGS.top_p, seed=FLAGS.seed, stop=FLAGS.stop, use_cache=FLAGS.cache)
    if FLAGS.num_samples == 1:
        pieces = []  # kept only for --output: a long stream holds nothing
        for piece in gen.stream(prompt, chunk_size=FLAGS.chunk_size, **kw):
            if FLAGS.output:
                pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        final = "".join(pieces)
    else:
        texts = gen.samples(prompt, FLAGS.num_samples, **kw)
        final = "\n".join(f"--- sample {i + 1} (step {run.step}) ---\n{t}" for i, t in enumerate(texts))
        print(final, flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            f.write(final + "\n")


def run_main() -> None:
    """The `gptjax-sample` console script."""
    define_flags()
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
