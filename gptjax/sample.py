"""`python -m gptjax.sample --workdir DIR --prompt "ROMEO:"`

Restores a checkpoint and the tokenizer from a workdir and generates text.

Generation is a small state machine that runs inside `jax.jit`:

  start:   one prefill pass over the prompt writes every layer's keys and
           values into a KV cache and gives the logits of the first new token;
  advance: a `jax.lax.while_loop` of decode steps, each sampling a token and
           feeding it to the model at the next cache position, until
           `max_new_tokens`, an end-of-text token or the stop string.

The whole generation (`generate`) is one compiled function, batched over
samples; streaming calls `advance` in chunks of steps instead and prints the
text between chunks. Learned position embeddings only exist for
`block_size` positions, so once the text fills the window the cache cannot
simply roll: each further token re-prefills the last `block_size - 1` tokens
(together with the new one, in one pass) at positions 0.., exactly the window
that recomputation would see. `use_cache=False` keeps the plain path, a full
forward pass over the window per token, for comparison.

Notebook use:

    from gptjax.sample import Generator
    g = Generator.from_workdir("runs/tiny")
    print(g.generate("ROMEO:", max_new_tokens=200))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import quantize as quantize_lib
from gptjax.checkpoint import Checkpointer
from gptjax.errors import UserError, exit_with
from gptjax.tokenizers import load_tokenizer

DEFAULT_TOP_K = 200
QUANTIZED_META = "quantization.json"  # marks a folder written by --save_quantized
QUANTIZED_PARAMS = "quantized"


# ----------------------------------------------------------------------------- choosing a token

def filter_logits(logits_BxV, top_k, top_p):
    """-inf for every token outside the top k and outside the nucleus of mass top_p.

    top_k = 0 (or >= vocab) keeps all tokens; top_p = 1 keeps all. The nucleus
    is the smallest set of most likely tokens (among the top k) whose
    probability reaches top_p. Both may be traced: one compiled function
    serves every setting. Tokens tied with the last one kept are kept too.
    """
    V = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    ranks = jnp.arange(V)
    probs = jax.nn.softmax(jnp.where(ranks < k, sorted_BxV, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_nucleus = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    n_keep = jnp.where(top_p < 1.0, jnp.minimum(n_nucleus, k), k)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep - 1, axis=-1)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample_token(logits_BxV, key, temperature, top_k=0, top_p=1.0):
    """Greedy when temperature == 0; else softmax(logits / T) within the top k and the nucleus."""
    greedy = jnp.argmax(logits_BxV, axis=-1)
    scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# ----------------------------------------------------------------------------- the decode state machine
#
# state: tokens [B, N] (prompt, then generated; N = block_size + max_new_tokens),
# length (tokens so far), logits [B, V] (the prediction for tokens[:, length]),
# cache + cache_len (cache position c holds token length - cache_len + c),
# done [B], key. settings: temperature, top_k, top_p, eot (-1: none),
# stop_ids [M] (M = 0: none), prompt_len, max_len (prompt_len + max_new_tokens).

def _prefill(model, tokens_BxN, prompt_len, use_cache: bool):
    block = model.cfg.block_size
    B = tokens_BxN.shape[0]
    # A fixed-size window (the prompt, then zeros that later steps overwrite): one
    # compiled prefill serves every prompt length.
    window = tokens_BxN[:, :block]
    if not use_cache:
        return model(window, logits_at=prompt_len - 1)[:, 0], (), jnp.int32(0)
    cache = model_lib.init_cache(model.cfg, B, block)
    logits, cache = model(window, cache=cache, pos=0, logits_at=prompt_len - 1)
    return logits[:, 0], cache, jnp.asarray(prompt_len, jnp.int32)


def _feed(model, tokens_BxN, i, cache, cache_len, mode: str):
    """Logits for token i + 1, given that tokens[:, i] was just written.

    mode "recompute": a full forward pass over the window ending at i (no cache);
    "append": one decode step at cache position cache_len;
    "slide": the window is full, so re-prefill its last block-1 tokens plus the new one at 0..block-1.
    """
    block = model.cfg.block_size
    B = tokens_BxN.shape[0]
    if mode == "recompute":
        start = jnp.maximum(0, i + 1 - block)
        window = jax.lax.dynamic_slice(tokens_BxN, (0, start), (B, block))
        return model(window, logits_at=i - start)[:, 0], cache, cache_len
    if mode == "append":
        tok = jax.lax.dynamic_slice(tokens_BxN, (0, i), (B, 1))
        logits, cache = model(tok, cache=cache, pos=cache_len)
        return logits[:, 0], cache, cache_len + 1
    window = jax.lax.dynamic_slice(tokens_BxN, (0, i + 1 - block), (B, block))
    logits, cache = model(window, cache=cache, pos=0, logits_at=block - 1)
    return logits[:, 0], cache, cache_len


def _start(model, tokens_BxN, prompt_len, key, use_cache: bool):
    logits, cache, cache_len = _prefill(model, tokens_BxN, prompt_len, use_cache)
    B = tokens_BxN.shape[0]
    return {"tokens": tokens_BxN, "length": jnp.asarray(prompt_len, jnp.int32), "logits": logits,
            "cache": cache, "cache_len": cache_len, "done": jnp.zeros((B,), bool), "key": key}


def _advance(model, state, settings, n_steps: int, use_cache: bool):
    """Up to n_steps decode steps; stops early at max_len or when every sample is done."""
    s = settings
    M = s["stop_ids"].shape[0]
    B = state["tokens"].shape[0]
    block = model.cfg.block_size
    limit = jnp.minimum(s["max_len"], state["length"] + n_steps)

    def body(st, mode):
        i = st["length"]
        # A key per position: chunked (streamed) and one-shot generation draw the same tokens.
        tok_B = sample_token(st["logits"], jax.random.fold_in(st["key"], i), s["temperature"], s["top_k"], s["top_p"])
        tokens = jax.lax.dynamic_update_slice(st["tokens"], tok_B[:, None], (0, i))
        hit = tok_B == s["eot"]
        if M:  # the stop string's tokens end here (host code cuts the text exactly)
            first = i - M + 1
            tail = jax.lax.dynamic_slice(tokens, (0, jnp.maximum(first, 0)), (B, M))
            hit |= jnp.all(tail == s["stop_ids"][None], axis=-1) & (first >= s["prompt_len"])
        logits, cache, cache_len = _feed(model, tokens, i, st["cache"], st["cache_len"], mode)
        return {**st, "tokens": tokens, "length": i + 1, "logits": logits, "cache": cache,
                "cache_len": cache_len, "done": st["done"] | hit}

    def going(st):
        return (st["length"] < limit) & ~jnp.all(st["done"])

    if not use_cache:
        return jax.lax.while_loop(going, functools.partial(body, mode="recompute"), state)
    # Two loops rather than a lax.cond per step: the cache fills, then (if the text goes on) slides.
    state = jax.lax.while_loop(lambda st: going(st) & (st["cache_len"] < block),
                               functools.partial(body, mode="append"), state)
    return jax.lax.while_loop(going, functools.partial(body, mode="slide"), state)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_cache"))
def start(graphdef, params, tokens_BxN, prompt_len, key, *, use_cache: bool = True):
    """Prefill: the generation state after the prompt (see the comment above)."""
    return _start(nnx.merge(graphdef, params), tokens_BxN, prompt_len, key, use_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_steps", "use_cache"), donate_argnames=("state",))
def advance(graphdef, params, state, settings, *, n_steps: int, use_cache: bool = True):
    """Up to n_steps more tokens: one chunk of a streamed generation."""
    return _advance(nnx.merge(graphdef, params), state, settings, n_steps, use_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_cache"))
def generate(graphdef, params, tokens_BxN, prompt_len, key, settings, *, use_cache: bool = True):
    """The whole generation, prefill and every decode step, as one compiled function.

    Returns (tokens [B, N], length): tokens[:, :length] are the prompt and the
    new tokens (a sample that hit its stop continues to be filled; the caller cuts).
    """
    model = nnx.merge(graphdef, params)
    state = _start(model, tokens_BxN, prompt_len, key, use_cache)
    state = _advance(model, state, settings, tokens_BxN.shape[1], use_cache)
    return state["tokens"], state["length"]


def _request(prompt_ids, num_samples: int, block: int, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, eot: int | None = None, stop_ids=()):
    """(tokens [num_samples, block + max_new_tokens] holding the prompt, settings) for `generate`."""
    P = len(prompt_ids)
    tokens = np.zeros((num_samples, block + max_new_tokens), np.int32)
    tokens[:, :P] = prompt_ids
    settings = {
        "temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
        "eot": jnp.int32(-1 if eot is None else eot), "stop_ids": jnp.asarray(stop_ids, jnp.int32).reshape(-1),
        "prompt_len": jnp.int32(P), "max_len": jnp.int32(P + max_new_tokens),
    }
    return jnp.asarray(tokens), settings


def generate_ids(graphdef, params, prompt_ids, seed: int, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, use_cache: bool = True) -> np.ndarray:
    """Prompt ids (at most block_size of them) + max_new_tokens sampled ids, for one sample."""
    block = nnx.merge(graphdef, params).cfg.block_size
    prompt_ids = np.asarray(prompt_ids, np.int32)[-block:]
    P = len(prompt_ids)
    tokens, settings = _request(prompt_ids, 1, block, max_new_tokens, temperature, top_k, top_p)
    out, _ = generate(graphdef, params, tokens, P, jax.random.key(seed), settings, use_cache=use_cache)
    return np.asarray(jax.device_get(out))[0, : P + max_new_tokens]


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
    if num_samples < 1:
        raise UserError(f"{prefix}num_samples must be >= 1, got {num_samples}.")


def clamp_top_k(top_k: int, vocab_size: int, explicit: bool, prefix: str = "") -> int:
    """top_k above the vocabulary size means every token: clamped, with a warning when asked for."""
    if top_k <= vocab_size:
        return top_k
    if explicit:
        warnings.warn(f"{prefix}top_k={top_k} is larger than the vocabulary ({vocab_size} tokens); "
                      f"using top_k={vocab_size}, i.e. no top-k cut.", stacklevel=3)
    return vocab_size


# ----------------------------------------------------------------------------- loading a workdir

@dataclasses.dataclass
class LoadedRun:
    workdir: str
    cfg: object
    tokenizer: object
    graphdef: object
    params: dict
    step: int
    quantized: str  # "none" | "int8"
    float_bytes: int  # parameter bytes of the float model
    param_bytes: int  # parameter bytes as loaded


def _read_config(workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir} has no config.json; is it a gptjax workdir? Train with --workdir {workdir}.")
    with open(path, encoding="utf-8") as f:
        return config_lib.from_json(f.read())


def _abstract(cfg, scheme: str):
    abstract = nnx.eval_shape(lambda: quantize_lib.quantize_model(model_lib.GPT(cfg.model, rngs=nnx.Rngs(0)), scheme))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                          nnx.to_pure_dict(nnx.state(abstract)))
    return nnx.graphdef(abstract), target


def load_run(workdir: str, step: int | None = None, quantize: str = "none") -> LoadedRun:
    """The model of a workdir (or of a folder written by --save_quantized), optionally quantized."""
    quantize_lib.check_scheme(quantize)
    cfg = _read_config(workdir)
    per_layer = cfg.copy_and_resolve_references()
    with per_layer.unlocked():
        per_layer.model.scan_layers = False  # checkpoints (and quantized copies) hold the per-layer layout
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    float_bytes = quantize_lib.tree_bytes(_abstract(cfg, "none")[1])
    meta_path = os.path.join(workdir, QUANTIZED_META)
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if step is not None and step != meta["step"]:
            raise UserError(f"{workdir} holds a quantized model of step {meta['step']} only; drop --step.")
        graphdef, target = _abstract(per_layer, meta["scheme"])
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.abspath(os.path.join(workdir, QUANTIZED_PARAMS)), target)
        return LoadedRun(workdir, cfg, tokenizer, graphdef, params, meta["step"], meta["scheme"], float_bytes,
                         quantize_lib.tree_bytes(params))

    ckpt = Checkpointer(workdir, create=False, async_save=False)
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"{workdir} has no checkpoint yet; train first with --workdir {workdir}.")
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint at step {step} in {workdir}; steps with checkpoints: {steps}.")
    graphdef, target = _abstract(per_layer, "none")
    try:
        if step is None:  # the newest that restores; a damaged newer one is reported, never moved
            step, params, _, _ = ckpt.restore_newest(
                target, log=lambda msg: print(msg, file=sys.stderr, flush=True), move_broken=False)
        else:
            params = ckpt.restore_one(step, target)
    finally:
        ckpt.close()
    if cfg.model.get("scan_layers", False) and quantize == "none":
        graphdef, params = _abstract(cfg, "none")[0], model_lib.stack_layers(params)
    if quantize != "none":  # int8 swaps the per-layer model's Linear/Embed modules
        model = quantize_lib.quantize_model(nnx.merge(graphdef, params), quantize)
        graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    return LoadedRun(workdir, cfg, tokenizer, graphdef, params, step, quantize, float_bytes,
                     quantize_lib.tree_bytes(params))


def save_quantized(run: LoadedRun, directory: str) -> None:
    """Write a quantized model as a folder that sample/eval load like a workdir."""
    if run.quantized == "none":
        raise UserError("--save_quantized needs --quantize int8.")
    if os.path.exists(directory) and os.listdir(directory):
        raise UserError(f"--save_quantized folder {directory} exists and is not empty; give a new folder.")
    import orbax.checkpoint as ocp

    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.path.join(directory, QUANTIZED_PARAMS)), run.params)
        ckptr.wait_until_finished()
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(run.cfg))
    run.tokenizer.save(os.path.join(directory, "tokenizer"))
    with open(os.path.join(directory, QUANTIZED_META), "w", encoding="utf-8") as f:
        json.dump({"scheme": run.quantized, "step": run.step, "param_bytes": run.param_bytes,
                   "float_bytes": run.float_bytes}, f, indent=2)


def encode_prompt(tokenizer, prompt: str, block_size: int) -> np.ndarray:
    ids = tokenizer.encode(prompt) if prompt else np.zeros((0,), np.int32)
    if ids.size == 0:  # start from end-of-text, or a newline, or token 0
        if tokenizer.eot_id is not None:
            ids = np.array([tokenizer.eot_id], np.int32)
        else:
            try:
                ids = tokenizer.encode("\n")
            except UserError:
                ids = np.zeros((1,), np.int32)
    return ids[-block_size:]


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
        ids = encode_prompt(self.tokenizer, prompt, self.block_size)
        stop_ids = self.tokenizer.encode(stop) if stop else ()
        tokens, settings = _request(ids, num_samples, self.block_size, max_new_tokens, temperature, top_k, top_p,
                                    self.tokenizer.eot_id, stop_ids)
        return tokens, len(ids), jax.random.key(seed), settings

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
        tokens, prompt_len, key, settings = self._prepare(
            prompt, num_samples, max_new_tokens, temperature, top_k, top_p, stop, seed)
        out, length = generate(self.run.graphdef, self.run.params, tokens, prompt_len, key, settings,
                               use_cache=use_cache)
        out, length = jax.device_get((out, length))
        return [prompt + self._completion(row[prompt_len:int(length)], stop)[0] for row in out]

    def generate(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float = 1.0, seed: int = 0, stop: str | None = None,
                 use_cache: bool = True) -> str:
        """One continuation of `prompt`: prompt + generated text."""
        return self.samples(prompt, 1, max_new_tokens, temperature, top_k, top_p, seed, stop, use_cache)[0]

    def stream(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = None, top_p: float = 1.0, seed: int = 0, stop: str | None = None,
               use_cache: bool = True, chunk_size: int = 16) -> Iterator[str]:
        """Yield the prompt, then the generated text piece by piece, chunk_size tokens at a time.

        The pieces join to exactly `generate(...)` with the same arguments.
        """
        if chunk_size < 1:
            raise UserError(f"chunk_size must be >= 1, got {chunk_size}.")
        tokens, prompt_len, key, settings = self._prepare(
            prompt, 1, max_new_tokens, temperature, top_k, top_p, stop, seed)
        g = self.run
        yield prompt
        state = start(g.graphdef, g.params, tokens, prompt_len, key, use_cache=use_cache)
        shown = 0
        hold = len(stop) - 1 if stop else 0  # a stop string may begin in this chunk and end in the next
        max_len = prompt_len + max_new_tokens
        while True:
            state = advance(g.graphdef, g.params, state, settings, n_steps=chunk_size, use_cache=use_cache)
            length, done = (int(x) for x in jax.device_get((state["length"], state["done"][0])))
            row = np.asarray(jax.device_get(state["tokens"][0, prompt_len:length]))
            text, stopped = self._completion(row, stop)
            finished = stopped or done or length >= max_len
            end = len(text) if finished else max(shown, len(text) - hold)
            if not finished and text[end - 1:end] == "\ufffd":  # a multi-byte character still arriving
                end -= 1
            if end > shown:
                yield text[shown:end]
                shown = end
            if finished:
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
    flags.DEFINE_enum("quantize", "none", list(quantize_lib.SCHEMES), "Weight quantization for sampling.")
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
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; flags go as --name=value.")
        if FLAGS.workdir is None:
            raise UserError("--workdir is required: the folder of a training run.")
        check_sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.max_new_tokens, FLAGS.num_samples, "--")
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
            pieces = []
            for piece in gen.stream(prompt, chunk_size=FLAGS.chunk_size, **kw):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            final = "".join(pieces)
        else:
            texts = gen.samples(prompt, FLAGS.num_samples, **kw)
            blocks = [f"--- sample {i + 1} (step {run.step}) ---\n{t}" for i, t in enumerate(texts)]
            final = "\n".join(blocks)
            print(final, flush=True)
        if FLAGS.output:
            with open(FLAGS.output, "w", encoding="utf-8") as f:
                f.write(final + "\n")
    except UserError as e:
        exit_with(e)


if __name__ == "__main__":
    define_flags()
    app.run(main)
