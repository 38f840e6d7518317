"""Hugging Face GPT-2 <-> gptjax: the pure mapping of configs, parameters and tokenizer files.

No file I/O here (`gptjax/convert.py` reads and writes); every function takes
and returns plain dicts, NumPy arrays and strings.

Parameters. HF's GPT-2 uses Conv1D layers whose weights are stored
input-major, [in, out], as our Dense kernels are, so only the fused
query/key/value projection needs care: HF's `c_attn` columns are
q | k | v, each of them head after head ([3, H, hd]); ours are head-major
([H, 3, hd]) so that the tensor axis splits whole heads.

    transformer.wte.weight [V, D]          wte.embedding
    transformer.wpe.weight [P, D]          wpe.embedding
    transformer.h.{i}.ln_1.{weight,bias}   blocks.i.ln_1.{scale,bias}
    transformer.h.{i}.attn.c_attn.*        blocks.i.attn.qkv.*     (columns reordered)
    transformer.h.{i}.attn.c_proj.*        blocks.i.attn.proj.*
    transformer.h.{i}.ln_2.*               blocks.i.ln_2.*
    transformer.h.{i}.mlp.c_fc.*           blocks.i.mlp.fc.*
    transformer.h.{i}.mlp.c_proj.*         blocks.i.mlp.proj.*
    transformer.ln_f.*                     ln_f.*
    lm_head.weight [V, D] (untied only)    lm_head.kernel [D, V]

GPT-2 always has biases; a gptjax model without them is exported with zero
biases and a `gptjax` entry in config.json that lets the import drop them
again, so export -> import gives back exactly the same parameters.
"""

from __future__ import annotations

import json
import re

import numpy as np

from gptjax.errors import UserError

# A Hugging Face checkpoint folder's file names (its own layout, not a gptjax workdir's).
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"

PREFIX = "transformer."
LAYER_NORM_EPS = 1e-5  # gptjax's LayerNorm epsilon (model.py), GPT-2's too
# HF `activation_function` values whose function is exactly one of ours (transformers' ACT2FN):
# gelu_new and gelu_pytorch_tanh are both 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
GPT2_VOCAB_SIZE = 50257
# The model keys an HF config decides; the rest of the `model` section (dtype, attention, ...) is ours to pick.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "qkv_bias", "tie_embeddings",
              "activation")


# ----------------------------------------------------------------------------- configs

def model_config_from_hf(hf: dict, where: str) -> dict:
    """The `model` keys (SHAPE_KEYS) for an HF GPT-2 config.json; a UserError for anything GPT-2 we cannot run."""
    kind = hf.get("model_type")
    if kind != "gpt2":
        raise UserError(f"{where} holds a {kind or 'unknown'!s} model (config.json model_type: {kind!r}); "
                        "gptjax imports GPT-2 checkpoints only (model_type 'gpt2').")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise UserError(f"{where}/config.json lacks {', '.join(missing)}; is it a GPT-2 config?")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATION_FROM_HF:
        raise UserError(f"{where}: activation_function {act!r} has no gptjax equivalent; "
                        f"supported: {', '.join(ACTIVATION_FROM_HF)}.")
    D = hf["n_embd"]
    unsupported = []
    if hf.get("n_inner") not in (None, 4 * D):
        unsupported.append(f"n_inner={hf['n_inner']} (gptjax's MLP is 4 * n_embd = {4 * D} wide)")
    if not hf.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
        unsupported.append("add_cross_attention=true")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not np.isclose(eps, LAYER_NORM_EPS, rtol=1e-6, atol=0):
        unsupported.append(f"layer_norm_epsilon={eps} (gptjax uses {LAYER_NORM_EPS})")
    if unsupported:
        raise UserError(f"{where}: this GPT-2 variant is not supported: {'; '.join(unsupported)}.")
    ours = hf.get("gptjax", {})  # written by our export: biases the model did not have
    return {
        "n_layer": int(hf["n_layer"]), "n_head": int(hf["n_head"]), "n_embd": int(D),
        "block_size": int(hf["n_positions"]), "vocab_size": int(hf["vocab_size"]),
        "bias": bool(ours.get("bias", True)), "qkv_bias": bool(ours.get("qkv_bias", True)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "activation": ACTIVATION_FROM_HF[act],
    }


# The model switches GPT-2 has no counterpart for, with their GPT-2 values (zero_init_proj only
# changes the initial weights, so it exports).
GPT2_VALUES = {"position": "learned", "norm": "layernorm", "qk_norm": False, "logit_softcap": 0.0}


def gpt2_incompatible(m) -> list[str]:
    """`model.KEY=value` for each setting a GPT-2 checkpoint cannot represent (empty: exportable)."""
    bad = [f"model.{k}={m[k]!r}" for k, v in GPT2_VALUES.items() if m.get(k, v) != v]
    if m.activation not in ACTIVATION_TO_HF:
        bad.append(f"model.activation={m.activation!r}")
    return bad


def hf_config_from_model(m, eot_id: int | None = None) -> dict:
    """config.json for `transformers` (GPT2LMHeadModel) from our `model` section."""
    bad = gpt2_incompatible(m)
    if bad:
        raise UserError(f"this model cannot be exported as GPT-2: {', '.join(bad)} "
                        f"(GPT-2 has learned positions, LayerNorm, no QK-norm or logit soft-cap, and the "
                        f"activations {', '.join(ACTIVATION_TO_HF)}).")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_embd": m.n_embd,
        "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": None,
        "activation_function": ACTIVATION_TO_HF[m.activation], "layer_norm_epsilon": LAYER_NORM_EPS,
        # Our dropout acts on the embeddings and the residual branches, never on attention probabilities.
        "embd_pdrop": m.dropout, "resid_pdrop": m.dropout, "attn_pdrop": 0.0,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": m.param_dtype, "dtype": m.param_dtype,
        "initializer_range": 0.02, "use_cache": True,
        "gptjax": {"bias": bool(m.bias), "qkv_bias": bool(m.qkv_bias)},
    }


# ----------------------------------------------------------------------------- parameters

def _qkv_from_hf(a, n_head: int):
    """[..., 3D] columns q|k|v (each head after head) -> head-major [..., H, 3, hd] columns."""
    *lead, three_d = a.shape
    hd = three_d // 3 // n_head
    return a.reshape(*lead, 3, n_head, hd).swapaxes(-3, -2).reshape(*lead, three_d)


def _qkv_to_hf(a, n_head: int):
    *lead, three_d = a.shape
    hd = three_d // 3 // n_head
    return a.reshape(*lead, n_head, 3, hd).swapaxes(-3, -2).reshape(*lead, three_d)


def _layer_names(i: int) -> dict[str, tuple]:
    """HF name (without PREFIX) -> (our path in the block, kind) for layer i."""
    h = f"h.{i}."
    return {
        h + "ln_1.weight": ("ln_1", "scale"), h + "ln_1.bias": ("ln_1", "bias"),
        h + "attn.c_attn.weight": ("attn", "qkv", "kernel"), h + "attn.c_attn.bias": ("attn", "qkv", "bias"),
        h + "attn.c_proj.weight": ("attn", "proj", "kernel"), h + "attn.c_proj.bias": ("attn", "proj", "bias"),
        h + "ln_2.weight": ("ln_2", "scale"), h + "ln_2.bias": ("ln_2", "bias"),
        h + "mlp.c_fc.weight": ("mlp", "fc", "kernel"), h + "mlp.c_fc.bias": ("mlp", "fc", "bias"),
        h + "mlp.c_proj.weight": ("mlp", "proj", "kernel"), h + "mlp.c_proj.bias": ("mlp", "proj", "bias"),
    }


def _has(path: tuple, m) -> bool:
    """Whether our model (with m's bias settings) has the parameter at this path inside a block / ln_f."""
    if path[-1] != "bias":
        return True
    return bool(m.qkv_bias) if path[:2] == ("attn", "qkv") else bool(m.bias)


def expected_shapes(m) -> dict[str, tuple]:
    """HF tensor name -> shape for a GPT-2 of our model's shape (all biases included)."""
    V, P, D = m.vocab_size, m.block_size, m.n_embd
    shapes = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    per_layer = {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
                 "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
                 "mlp.c_fc.weight": (D, 4 * D), "mlp.c_fc.bias": (4 * D,), "mlp.c_proj.weight": (4 * D, D),
                 "mlp.c_proj.bias": (D,)}
    for i in range(m.n_layer):
        shapes.update({f"h.{i}.{k}": s for k, s in per_layer.items()})
    return {PREFIX + k: s for k, s in shapes.items()}


def _normalise_names(tensors: dict) -> dict:
    """Accept GPT2Model's names (no `transformer.` prefix) as well as GPT2LMHeadModel's."""
    out = {}
    for k, v in tensors.items():
        if k == "lm_head.weight" or k.startswith(PREFIX):
            out[k] = v
        else:
            out[PREFIX + k] = v
    return out


# Buffers older checkpoints saved with the weights (the causal mask), not parameters.
_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def params_from_hf(tensors: dict, m, where: str, dtype=np.float32) -> dict:
    """Our pure parameter dict (NumPy arrays of `dtype`) from HF GPT-2 tensors; UserError on a mismatch."""
    tensors = {k: v for k, v in _normalise_names(tensors).items() if not _BUFFER.match(k)}
    shapes = expected_shapes(m)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, m.n_embd)
    missing = sorted(set(shapes) - set(tensors))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})" for k in sorted(shapes)
             if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    extra = sorted(set(tensors) - set(shapes) - {"lm_head.weight"})
    if missing or wrong or extra:
        parts = ([f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"] if missing else []) + \
                ([f"wrong shapes: {', '.join(wrong[:6])}"] if wrong else []) + \
                ([f"unexpected {', '.join(extra[:6])}"] if extra else [])
        raise UserError(f"{where}: the weights do not match its config.json as a GPT-2 ({'; '.join(parts)}).")

    def get(name):
        return np.asarray(tensors[PREFIX + name]).astype(dtype)

    def dropped_bias(name):  # a bias our model does not have: the export wrote zeros there
        if np.any(np.asarray(tensors[PREFIX + name]) != 0):
            raise UserError(f"{where}: config.json says the model has no such bias, but {name} is not zero.")

    blocks = {}
    for i in range(m.n_layer):
        block: dict = {}
        for name, path in _layer_names(i).items():
            if not _has(path, m):
                dropped_bias(name)
                continue
            value = get(name)
            if path[:2] == ("attn", "qkv"):
                value = _qkv_from_hf(value, m.n_head)
            node = block
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        blocks[i] = block
    params = {"wte": {"embedding": get("wte.weight")}, "wpe": {"embedding": get("wpe.weight")},
              "blocks": blocks, "ln_f": {"scale": get("ln_f.weight")}}
    if m.bias:
        params["ln_f"]["bias"] = get("ln_f.bias")
    else:
        dropped_bias("ln_f.bias")
    if not m.tie_embeddings:
        params["lm_head"] = {"kernel": np.asarray(tensors["lm_head.weight"]).astype(dtype).T.copy()}
    return params


def params_to_hf(params: dict, m) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel tensors (float32, contiguous) from our pure parameter dict; zeros for missing biases."""
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
    D = m.n_embd
    out = {"wte.weight": f32(params["wte"]["embedding"]), "wpe.weight": f32(params["wpe"]["embedding"]),
           "ln_f.weight": f32(params["ln_f"]["scale"]),
           "ln_f.bias": f32(params["ln_f"]["bias"]) if m.bias else np.zeros((D,), np.float32)}
    shapes = expected_shapes(m)
    for i in range(m.n_layer):
        block = params["blocks"][i]
        for name, path in _layer_names(i).items():
            if not _has(path, m):
                out[name] = np.zeros(shapes[PREFIX + name], np.float32)
                continue
            node = block
            for key in path:
                node = node[key]
            value = f32(node)
            out[name] = f32(_qkv_to_hf(value, m.n_head)) if path[:2] == ("attn", "qkv") else value
    out = {PREFIX + k: v for k, v in out.items()}
    if not m.tie_embeddings:
        out["lm_head.weight"] = f32(np.asarray(params["lm_head"]["kernel"]).T)
    return out


# ----------------------------------------------------------------------------- tokenizer files

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet of vocab.json and merges.txt)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_vocab_and_merges(token_bytes: list[bytes], eot: str) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt lines from byte-pair ranks (token_bytes[rank]), plus the end-of-text id.

    Each token of rank r >= 256 is the merge of the two pieces that BPE,
    using only ranks below r, reduces its bytes to.
    """
    spell = bytes_to_unicode()
    text = lambda b: "".join(spell[x] for x in b)
    ranks = {b: r for r, b in enumerate(token_bytes)}
    vocab = {text(b): r for r, b in enumerate(token_bytes)}
    vocab[eot] = len(token_bytes)
    merges = []
    for r, tok in enumerate(token_bytes):
        if len(tok) < 2:
            continue
        parts = [bytes([x]) for x in tok]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], r), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= r:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"rank {r} ({tok!r}) is not a merge of two lower-ranked tokens")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    return vocab, merges


def char_tokenizer_json(chars: list[str]) -> dict:
    """A `tokenizers` tokenizer.json giving id i to chars[i]: BPE without merges splits text into characters."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {ch: i for i, ch in enumerate(chars)}, "merges": []},
    }


def tokenizer_files(tokenizer, block_size: int) -> tuple[dict[str, str], str | None]:
    """({file name: text} for an HF folder, a note on what differs or None) for one of our tokenizers."""
    if tokenizer.kind == "gpt2":
        enc = tokenizer.enc
        eot = enc.decode([tokenizer.eot_id])
        token_bytes = [enc.decode_single_token_bytes(i) for i in range(tokenizer.eot_id)]
        vocab, merges = gpt2_vocab_and_merges(token_bytes, eot)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
                  "add_prefix_space": False, "model_max_length": block_size,
                  "split_special_tokens": True}  # as ours: a literal <|endoftext|> in text stays text
        return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
                "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
                "tokenizer_config.json": json.dumps(config, indent=2)}, None
    if tokenizer.kind == "char":
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
        note = ("character tokenizer: tokenizer.json gives each character our id; a character outside the "
                "vocabulary is dropped by transformers, where gptjax refuses the text.")
        return {"tokenizer.json": json.dumps(char_tokenizer_json(tokenizer.chars), ensure_ascii=False),
                "tokenizer_config.json": json.dumps(config, indent=2)}, note
    note = (f"{tokenizer.kind} tokenizer: no transformers tokenizer files were written; encode with gptjax "
            "(gptjax.tokenizers.load_tokenizer on the workdir's tokenizer/ folder) and pass the ids.")
    return {}, note


def tokenizer_for_import(files: dict[str, str], vocab_size: int, gpt2_vocab, where: str) -> tuple[str, list[str] | None]:
    """("gpt2", None) or ("char", characters) for an HF folder's tokenizer files (name -> text); else a UserError.

    GPT-2's own vocabulary (vocab.json, or tokenizer.json's model.vocab)
    means our GPT-2 BPE; a tokenizer.json of single characters without merges
    (what our export writes for a character tokenizer) means that character
    tokenizer. A checkpoint without tokenizer files is taken as GPT-2 BPE when
    it has GPT-2's 50257 ids, else as ids that are Unicode code points
    0..V-1: small test models ship no tokenizer. `gpt2_vocab()` gives our
    GPT-2 vocab.json; it is called only for a vocabulary that could be GPT-2's.
    """
    spec = json.loads(files["tokenizer.json"]) if "tokenizer.json" in files else None
    vocab = json.loads(files["vocab.json"]) if "vocab.json" in files else spec and spec.get("model", {}).get("vocab")
    if vocab is None:
        if vocab_size == GPT2_VOCAB_SIZE:
            return "gpt2", None
        if vocab_size > 0xD800:  # code points beyond this include surrogates, which are not text
            raise UserError(f"{where} has no tokenizer files and {vocab_size} ids; add GPT-2's vocab.json and "
                            "merges.txt, or a tokenizer.json.")
        return "char", [chr(i) for i in range(vocab_size)]
    chars = sorted(vocab, key=vocab.get)
    if spec is not None and not spec["model"].get("merges") and all(len(c) == 1 for c in chars) \
            and [vocab[c] for c in chars] == list(range(vocab_size)) and chars == sorted(chars):
        return "char", chars
    if len(vocab) == GPT2_VOCAB_SIZE and vocab == gpt2_vocab():
        if vocab_size != GPT2_VOCAB_SIZE:
            raise UserError(f"{where}: its tokenizer is GPT-2's ({GPT2_VOCAB_SIZE} ids) but the model has "
                            f"{vocab_size} token embeddings; gptjax needs one embedding per tokenizer id.")
        return "gpt2", None
    raise UserError(f"{where}: its tokenizer is not GPT-2's BPE nor a character tokenizer; gptjax imports "
                    "those only (or a checkpoint without tokenizer files).")
