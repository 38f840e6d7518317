"""Defaults, model-size presets and validation for the run configuration.

A run is described by one `ml_collections.ConfigDict` with five sections
(`model`, `train`, `data`, `log`, `mesh`) and a `workdir`. Config files under
`configs/` start from `base_config()` and change what they need; the command
line overrides single keys (`--config.model.n_layer=6`).
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from flax.traverse_util import flatten_dict

from gptjax.errors import UserError

# The valid values of each key that picks between implementations. The modules
# that dispatch on a key import its tuple from here; `validate` checks it once.
ACTIVATIONS = ("gelu", "relu", "gelu_tanh", "relu2")  # gelu_tanh: GPT-2's tanh approximation
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
OPTIMIZERS = ("adamw", "muon")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn")
MATMUL_IMPLS = ("auto", "xla", "tokens")
DATASETS = ("tinyshakespeare", "tinystories", "wikitext2", "wikitext103", "openwebtext", "text", "hf")
TOKENIZERS = ("char", "sentencepiece", "gpt2")  # or a path to a sentencepiece .model file
SP_MODEL_TYPES = ("bpe", "unigram")
QUANTIZE_SCHEMES = ("none", "int8")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.block_size = 64
    c.model.dropout = 0.0
    c.model.bias = False  # biases in Dense layers and LayerNorms
    c.model.qkv_bias = False  # biases in the query/key/value projection
    c.model.tie_embeddings = True  # output projection = token embedding^T
    c.model.activation = "gelu"  # gelu (exact) | relu | gelu_tanh (GPT-2's) | relu2 (relu squared)
    c.model.position = "learned"  # learned (wpe table) | rope (rotary q/k; no wpe)
    c.model.rope_base = 10000.0
    c.model.norm = "layernorm"  # layernorm | rmsnorm
    c.model.qk_norm = False  # RMSNorm of each head's queries and keys
    c.model.logit_softcap = 0.0  # logits = c * tanh(logits / c); 0: off
    c.model.zero_init_proj = False  # residual output projections (attention and MLP) start at zero
    c.model.vocab_size = 0  # 0: taken from the tokenizer
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # master weights
    c.model.attention = "auto"  # auto | xla | dot_product | cudnn
    c.model.matmul = "auto"  # auto | xla | tokens (Dense backward as [tokens, features] matmuls; auto: tokens on CPU)
    c.model.remat = False
    c.model.scan_layers = False  # blocks under one nnx scan: compile time flat in depth (docs/scan_layers.md)
    c.model.scan_unroll = 1  # scan_layers: blocks per scan iteration (1: one compiled block)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.batch_size = 12  # global batch, in sequences
    c.train.lr = 1e-3
    c.train.min_lr = 1e-4
    c.train.warmup_steps = 100
    c.train.decay_steps = 0  # 0: decay over all of train.steps
    c.train.weight_decay = 0.1
    c.train.beta1 = 0.9
    c.train.beta2 = 0.99
    c.train.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.train.optimizer = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest)
    c.train.muon_lr = 0.02  # optimizer=muon: peak learning rate of the Muon matrices (same schedule shape)
    c.train.muon_beta = 0.95  # optimizer=muon: Muon's momentum
    c.train.muon_ns_steps = 5  # optimizer=muon: Newton-Schulz iterations per update (each ~3 matmuls per matrix)
    c.train.eval_every = 250
    c.train.eval_steps = 20
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.seed = 1337
    c.train.grad_accum = 1
    c.train.steps_per_call = 1  # optimizer steps per compiled call (lax.scan); should divide log_every
    c.train.compilation_cache = True  # persistent XLA compilation cache under ~/.cache/gptjax/jax
    c.train.diagnostics_every = 0  # per-layer grad/update/activation/attention stats every N steps; 0: off
    c.train.sample_every = 0  # print and save a short sample every N steps; 0: off
    c.train.sample_prompt = "\n"  # fixed prompt of those samples
    c.train.sample_tokens = 200  # new tokens per sample
    c.train.eval_full = False  # also a full pass over the validation split at the end
    c.train.max_bad_steps = 10  # stop after more than this many non-finite (skipped) steps in a row
    c.train.allow_config_change = False  # resume with a changed train.* (steps, lr schedule, eval cadence)
    c.train.init_from = ""  # start from these weights: a workdir, or hf:NAME_OR_PATH (a GPT-2 checkpoint)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "tinyshakespeare"  # tinyshakespeare|tinystories|wikitext2|wikitext103|openwebtext|text|hf
    c.data.path = ""  # local file, folder or glob of .txt/.jsonl/.json/.parquet (wins over the named dataset)
    c.data.text_field = "text"  # column that holds the text in .json/.jsonl/.parquet files and hub datasets
    c.data.hf_name = ""  # dataset=hf: a Hugging Face hub dataset name
    c.data.hf_config = ""  # dataset=hf: its config name, if it has several
    c.data.hf_train_split = "train"
    c.data.hf_val_split = "validation"  # "": cut data.val_fraction of the training rows off instead
    c.data.streaming = False  # stream hub datasets instead of downloading them whole
    c.data.tokenizer = "char"  # char | sentencepiece | gpt2 | path/to/a/sentencepiece.model
    c.data.vocab_size = 0  # sentencepiece: vocabulary to train
    c.data.sp_model_type = "bpe"  # sentencepiece: bpe | unigram
    c.data.sp_max_chars = 5_000_000  # sentencepiece: cap on training characters (keeps training to seconds)
    c.data.num_proc = 0  # tokenization threads; 0: one per core, at most 8
    c.data.val_fraction = 0.1  # where a source has no validation split

    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True  # scalar event files in WORKDIR/tensorboard
    c.log.wandb = False  # also log to Weights & Biases, when the wandb package is installed
    c.log.wandb_project = "gptjax"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def apply_modern(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The modded-nanogpt recipe on top of a GPT-2 config, same shape (docs/modern.md has the measurements).

    Rotary positions (no wpe table), RMSNorm, ReLU^2, QK-norm, a logit
    soft-cap and zero-initialised residual projections; Muon trains the
    blocks' matrices. The head stays as the config has it: untying it adds
    vocab x n_embd parameters (0.1% at 65 characters, 25% at a 2048-piece
    vocabulary at width 128).
    """
    m = c.model
    m.position, m.norm, m.activation, m.qk_norm = "rope", "rmsnorm", "relu2", True
    m.logit_softcap, m.zero_init_proj = 30.0, True
    t = c.train
    t.optimizer, t.muon_lr, t.muon_ns_steps = "muon", 0.01, 3
    # Muon needs no long warm-up, and the AdamW part (embeddings, head, norms)
    # trains best at a higher rate beside it.
    t.warmup_steps, t.lr, t.min_lr = 20, 6e-3, 6e-4
    return c


def pick_size(size: str | None, sizes: tuple[str, ...], config_file: str) -> str:
    """`size` from `--config FILE:SIZE`, or the first of `sizes` when none was given."""
    if size is None:
        return sizes[0]
    if size not in sizes:
        raise ValueError(f"unknown size {size!r} for {config_file}; sizes: {', '.join(sizes)} "
                         f"(default {sizes[0]})")
    return size


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def require_choice(key: str, value, choices: tuple) -> None:
    """UserError unless `value` is one of `choices`; the message lists them."""
    _require(value in choices, f"{key} must be one of {', '.join(choices)}; got {value!r}.")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise a UserError that names the key and the fix for any bad value."""
    m, t = c.model, c.train
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        _require(m[key] >= 1, f"model.{key} must be a positive integer, got {m[key]}.")
    _require(
        m.n_embd % m.n_head == 0,
        f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
        f"pick e.g. --config.model.n_embd={max(1, round(m.n_embd / m.n_head)) * m.n_head}.",
    )
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}.")
    require_choice("model.activation", m.activation, ACTIVATIONS)
    require_choice("model.position", m.position, POSITIONS)
    require_choice("model.norm", m.norm, NORMS)
    _require(m.logit_softcap >= 0, f"model.logit_softcap must be >= 0 (0 turns it off), got {m.logit_softcap}.")
    _require(m.position != "rope" or (m.n_embd // m.n_head) % 2 == 0,
             f"model.position=rope needs an even head size; n_embd / n_head = {m.n_embd // m.n_head}.")
    _require(m.rope_base > 0, f"model.rope_base must be positive, got {m.rope_base}.")
    require_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _require(t.muon_lr > 0, f"train.muon_lr must be positive, got {t.muon_lr}.")
    _require(0 <= t.muon_beta < 1, f"train.muon_beta must be in [0, 1), got {t.muon_beta}.")
    _require(t.muon_ns_steps >= 1, f"train.muon_ns_steps must be a positive integer, got {t.muon_ns_steps}.")
    for key in ("dtype", "param_dtype"):
        require_choice(f"model.{key}", m[key], DTYPES)
    require_choice("model.attention", m.attention, ATTENTION_IMPLS)
    require_choice("model.matmul", m.matmul, MATMUL_IMPLS)
    _require(m.scan_unroll >= 1, f"model.scan_unroll must be a positive integer, got {m.scan_unroll}.")
    for key in ("steps", "batch_size", "eval_every", "eval_steps", "log_every", "checkpoint_every",
                "grad_accum", "steps_per_call"):
        _require(t[key] >= 1, f"train.{key} must be a positive integer, got {t[key]}.")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be a positive integer, got {t.keep_checkpoints}.")
    _require(t.max_bad_steps >= 0, f"train.max_bad_steps must be >= 0, got {t.max_bad_steps}.")
    for key in ("diagnostics_every", "sample_every"):
        _require(t[key] >= 0, f"train.{key} must be >= 0 (0 turns it off), got {t[key]}.")
    _require(t.sample_tokens >= 1, f"train.sample_tokens must be a positive integer, got {t.sample_tokens}.")
    _require(t.lr > 0, f"train.lr must be positive, got {t.lr}.")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr must be in [0, train.lr], got {t.min_lr}.")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}.")
    _require(
        t.batch_size % t.grad_accum == 0,
        f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum}).",
    )
    _require(0.0 < c.data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {c.data.val_fraction}.")
    d = c.data
    _require(d.dataset in DATASETS, f"unknown dataset {d.dataset!r}; known: {', '.join(DATASETS)} "
             "(text: your own files via data.path; hf: any hub dataset via data.hf_name).")
    _require(
        d.tokenizer in TOKENIZERS or d.tokenizer.endswith(".model"),
        f"data.tokenizer must be char, sentencepiece, gpt2 or a path to a sentencepiece .model file; "
        f"got {d.tokenizer!r}.",
    )
    _require(
        d.tokenizer != "sentencepiece" or d.vocab_size >= 1,
        "data.tokenizer=sentencepiece needs data.vocab_size, e.g. --config.data.vocab_size=4096.",
    )
    require_choice("data.sp_model_type", d.sp_model_type, SP_MODEL_TYPES)
    _require(d.sp_max_chars >= 1, f"data.sp_max_chars must be positive, got {d.sp_max_chars}.")
    _require(d.num_proc >= 0, f"data.num_proc must be >= 0 (0: one per core), got {d.num_proc}.")
    _require(c.workdir != "", "workdir is empty; pass --workdir DIR.")


# ----------------------------------------------------------------------------- config guard on resume

# Keys that do not change what the run computes: free to change on resume.
FREE_KEYS = {
    "workdir", "train.steps_per_call", "train.grad_accum", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_bad_steps", "train.allow_config_change",
    "model.attention", "model.remat", "model.matmul", "model.scan_layers",
    "model.scan_unroll",
}
FREE_SECTIONS = ("mesh.",)  # arrays are resharded on restore
# Keys that may change with --config.train.allow_config_change=True: the rest of the
# run trains differently but the checkpoint still fits. Any other model.* or data.* key
# is the model's shape, its tokenizer or its data: never changeable.
CHANGEABLE_KEYS = {"model.dropout", "model.dtype"}
CHANGEABLE_SECTIONS = ("train.",)
# ... except these: the checkpoint's optimizer state has the layout of its optimizer.
FIXED_KEYS = {"train.optimizer"}


def config_differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs, sorted by key."""
    a, b = flatten_dict(saved, sep="."), flatten_dict(new, sep=".")
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, missing), b.get(key, missing)
        if key == "model.vocab_size" and cur == 0:
            continue  # 0 means "from the tokenizer", which the workdir supplies
        if old is missing or cur is missing:
            continue  # a key newer or older code added: nothing to compare
        if old != cur:
            diffs.append((key, old, cur))
    return diffs


def change_kind(key: str) -> str:
    """'free', 'changeable' (with allow_config_change) or 'fixed'."""
    if key in FIXED_KEYS:
        return "fixed"
    if key in FREE_KEYS or key.startswith(FREE_SECTIONS):
        return "free"
    if key in CHANGEABLE_KEYS or key.startswith(CHANGEABLE_SECTIONS):
        return "changeable"
    return "fixed"


def check_resume_config(saved: dict, new: dict, allow_change: bool, workdir: str) -> list[str]:
    """Refuse a resume whose config differs from the workdir's in a way that matters.

    Returns the accepted changes as `key: old -> new` lines; raises a UserError
    listing every refused difference otherwise.
    """
    diffs = [(k, old, cur, change_kind(k)) for k, old, cur in config_differences(saved, new)]
    fixed = [d for d in diffs if d[3] == "fixed"]
    changeable = [d for d in diffs if d[3] == "changeable"]
    show = lambda ds: ", ".join(f"{k}: {old!r} -> {cur!r}" for k, old, cur, _ in ds)
    if fixed:
        raise UserError(
            f"{workdir} holds a run with a different model, tokenizer or data; refusing to resume. "
            f"Differences: {show(fixed)}. Use the run's own config (see {workdir}/config.json), "
            "or a new --workdir for a new run."
        )
    if changeable and not allow_change:
        raise UserError(
            f"the config differs from the one {workdir} was trained with: {show(changeable)}. "
            "Pass --config.train.allow_config_change=True to resume with these changes, "
            "or use the run's own values (see its config.json)."
        )
    return [f"{k}: {old!r} -> {cur!r}" for k, old, cur, kind in diffs if kind == "changeable"]


def to_json(c: ml_collections.ConfigDict) -> str:
    return json.dumps(c.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuild a config saved in a workdir, filling keys newer code added."""
    saved = json.loads(text)
    c = base_config()
    _merge(c, saved)
    return c


def _merge(c: ml_collections.ConfigDict, d: dict) -> None:
    with c.unlocked():
        for k, v in d.items():
            if isinstance(v, dict) and k in c and isinstance(c[k], ml_collections.ConfigDict):
                _merge(c[k], v)
            else:
                c[k] = v


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where configs/ lives in a checkout


def find_config_files(argv: list[str], default: str | None = "configs/tiny.py") -> None:
    """Make `--config FILE[:SIZE]` work from any folder; a file that is nowhere is one clear error.

    A relative FILE is looked up in the current folder first, then in the
    checkout gptjax runs from (so `--config configs/tiny.py` works anywhere
    after `pip install -e .`). Rewrites `argv` in place; with no --config
    flag, `default` is resolved the same way.
    """
    at = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if at is None:
        if default is None or os.path.exists(default):
            return
        argv.insert(1, f"--config={default}")
        at = 1
    if argv[at] == "--config":
        if at + 1 >= len(argv):
            return  # absl reports the missing value
        argv[at:at + 2] = [f"--config={argv[at + 1]}"]
    value = argv[at].split("=", 1)[1]
    path, sep, size = value.partition(":")
    if os.path.exists(path):
        return
    there = os.path.join(CHECKOUT, path)
    if not os.path.isabs(path) and os.path.exists(there):
        argv[at] = f"--config={there}{sep}{size}"
        return
    print(f"error: config file {path} does not exist; give a file such as configs/tiny.py "
          f"(see README 'Configuration').", file=sys.stderr)
    sys.exit(2)


def parse_flags_or_exit(argv: list[str], flag_values) -> list[str]:
    """absl flags parser that turns bad overrides into one clear line.

    ml_collections raises a bare AttributeError for an unknown key
    (`--config.model.n_lyer=6`) and absl prints its own FATAL line for a bad
    value; both become `error: ...` with the key and the fix.
    """
    from absl import flags

    try:
        return flag_values(argv)
    except SystemExit:  # absl's --help / --helpfull print the flags, then exit 1: asking for help is no error
        if any(a in ("--help", "-h", "--helpfull", "-?", "--helpshort") for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        msg = str(e)
        if "Traceback (most recent call last)" in msg:  # the config file's get_config raised: keep its message
            lines = [line for line in msg.splitlines() if line.strip()]
            msg = f"{lines[0].rstrip(': ')}: {lines[-1]}"
        print(f"error: {msg}\nRun with --helpfull to list the flags.", file=sys.stderr)
    except (AttributeError, KeyError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        print(
            f"error: unknown config key in an override ({', '.join(bad) or 'see the command line'}): {msg}. "
            "Config keys live in the sections model, train, data, log and mesh; see README 'Configuration'.",
            file=sys.stderr,
        )
    except (ValueError, TypeError, OSError, SyntaxError) as e:
        print(f"error: bad --config: {e}", file=sys.stderr)
    sys.exit(2)
