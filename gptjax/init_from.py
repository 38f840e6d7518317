"""Weights to start from: a Hugging Face GPT-2 checkpoint or another gptjax workdir.

`read(source)` loads one (`hf:NAME_OR_PATH` or a workdir path) as a
`Pretrained`: its model shape, parameters and tokenizer. The trainer calls
`adopt(cfg, pretrained)` (the run takes that model's shape and tokenizer;
a config that asks for another is one UserError) and `initial_params` for a
fresh run's weights; the optimizer starts fresh at step 0, as nanoGPT's
`init_from` does. `gptjax.convert` uses `read_hf` to import a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import hf
from gptjax.errors import UserError

HF_PREFIX = "hf:"
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2 on the hub (others work too)
# Files an HF GPT-2 folder may hold that we read; weights come from safetensors only.
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


@dataclasses.dataclass
class Pretrained:
    model: dict  # the `model` keys of hf.SHAPE_KEYS
    params: dict  # pure parameter dict (NumPy or JAX arrays) of that shape
    tokenizer: object
    source: str  # as the user named it, for messages


# ----------------------------------------------------------------------------- reading a Hugging Face folder

def hub_folder(name: str) -> str:
    """A local folder for `name`: the folder itself, or a hub download (a UserError offline)."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name} is not a folder; pass a Hugging Face GPT-2 checkpoint folder "
                        f"(config.json + model.safetensors) or a hub name ({', '.join(HUB_NAMES)}).")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "merges.txt", "vocab.json"])
    except Exception as e:  # offline, unknown repository, gated, ...: the hub raises many types
        raise UserError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}). Offline, download it "
            "elsewhere and pass its local folder (config.json + model.safetensors) instead of the name."
        ) from None


def _read_tensors(folder: str) -> dict:
    from safetensors import safe_open

    index = os.path.join(folder, hf.HF_WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, hf.HF_WEIGHTS_FILE)):
        files = [hf.HF_WEIGHTS_FILE]
    else:
        pickles = [n for n in _PICKLES if os.path.exists(os.path.join(folder, n))]
        if pickles:
            raise UserError(
                f"{folder} holds its weights only as {', '.join(pickles)}, which cannot be read without "
                "unpickling (that can run arbitrary code). Save it as safetensors first: "
                "AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(OUT, safe_serialization=True).")
        raise UserError(f"{folder} has no model.safetensors; is it a Hugging Face checkpoint folder?")
    tensors = {}
    for name in files:
        try:
            with safe_open(os.path.join(folder, name), framework="np") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # a truncated file, or a dtype NumPy lacks (bfloat16)
            raise UserError(f"cannot read {os.path.join(folder, name)} ({type(e).__name__}: {e}); "
                            "save the checkpoint as float32 or float16 safetensors.") from None
    return tensors


def read_hf_folder(folder: str, where: str) -> tuple[dict, dict, dict]:
    """(HF config dict, tensors, tokenizer files name -> text) of a checkpoint folder; UserError if not one."""
    path = os.path.join(folder, hf.HF_CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{where} has no config.json; pass a Hugging Face GPT-2 checkpoint folder "
                        "(config.json + model.safetensors).")
    try:
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({e}).") from None
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise UserError(f"{path} is not a Hugging Face model config (no model_type); pass a GPT-2 checkpoint.")
    model = hf.model_config_from_hf(hf_config, where)  # the architecture check, before any weight is read
    tensors = _read_tensors(folder)
    files = {}
    for name in _TOKENIZER_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                files[name] = f.read()
    return model, tensors, files


def hf_tokenizer(files: dict, vocab_size: int, where: str):
    from gptjax import tokenizers as tok_lib

    gpt2_vocab = lambda: hf.gpt2_vocab_and_merges(*_gpt2_ranks())[0]
    kind, chars = hf.tokenizer_for_import(files, vocab_size, gpt2_vocab, where)
    return tok_lib.GPT2Tokenizer.load() if kind == "gpt2" else tok_lib.CharTokenizer(chars)


def _gpt2_ranks():
    from gptjax.tokenizers import EOT, load_gpt2_encoding

    enc = load_gpt2_encoding()
    return [enc.decode_single_token_bytes(i) for i in range(enc.eot_token)], EOT


def read_hf(name_or_path: str, dtype=np.float32) -> Pretrained:
    """A Hugging Face GPT-2 checkpoint (local folder or hub name) as our model shape, parameters and tokenizer."""
    folder = hub_folder(name_or_path)
    model, tensors, files = read_hf_folder(folder, name_or_path)
    shape = config_lib.base_config().model
    shape.update(model)
    params = hf.params_from_hf(tensors, shape, name_or_path, dtype)
    return Pretrained(model, params, hf_tokenizer(files, model["vocab_size"], name_or_path), name_or_path)


# ----------------------------------------------------------------------------- a workdir

def read_workdir(path: str) -> Pretrained:
    """The newest checkpoint of a gptjax workdir that restores."""
    from gptjax.workdir import load_run  # the one loader of a run's config, tokenizer and checkpoint

    if not os.path.isdir(path):
        raise UserError(f"train.init_from={path}: no such workdir; give a gptjax workdir or hf:NAME_OR_PATH.")
    run = load_run(path)
    if run.quantized != "none":
        raise UserError(f"train.init_from={path} holds a quantized model; start from the float workdir.")
    return Pretrained({k: run.cfg.model[k] for k in hf.SHAPE_KEYS}, run.params, run.tokenizer, path)


def read(source: str) -> Pretrained:
    return read_hf(source[len(HF_PREFIX):]) if source.startswith(HF_PREFIX) else read_workdir(source)


# ----------------------------------------------------------------------------- the run that starts from it

def _tokenizer_kind(spec: str) -> str:
    return "sentencepiece" if spec.endswith(".model") else spec


def adopt(cfg, pre: Pretrained) -> None:
    """Give `cfg` the pretrained model's shape and tokenizer; one UserError lists every conflict.

    A key the config leaves at its default takes the pretrained value; a key
    set to another value conflicts, except model.block_size, which may be
    smaller (the position embeddings are cropped, as nanoGPT's crop_block_size).
    """
    default = config_lib.base_config()
    m, where = cfg.model, f"train.init_from={cfg.train.init_from}"
    conflicts = []
    for key in hf.SHAPE_KEYS:
        ours, theirs = m[key], pre.model[key]
        if key == "vocab_size":
            bad = ours not in (0, theirs)
        elif key == "block_size":
            bad = ours > theirs
        else:
            bad = ours != theirs and ours != default.model[key]
        if bad:
            conflicts.append(f"model.{key}={ours!r} (the model has {theirs!r})")
    tok = _tokenizer_kind(cfg.data.tokenizer)
    if tok != pre.tokenizer.kind and cfg.data.tokenizer != default.data.tokenizer:
        conflicts.append(f"data.tokenizer={cfg.data.tokenizer!r} (the model's is {pre.tokenizer.kind!r})")
    if conflicts:
        raise UserError(f"{where}: the config asks for another model than the one it starts from: "
                        f"{'; '.join(conflicts)}. Drop those overrides: the shape and tokenizer come from the model.")
    with cfg.unlocked():
        for key in hf.SHAPE_KEYS:
            if key != "block_size" or m.block_size == default.model.block_size:
                m[key] = pre.model[key]
        if pre.tokenizer.kind != tok:
            cfg.data.tokenizer = pre.tokenizer.kind
        if pre.tokenizer.kind == "sentencepiece":
            cfg.data.vocab_size = pre.tokenizer.vocab_size
    config_lib.validate(cfg)


def initial_params(pre: Pretrained, model_cfg, shardings):
    """The pretrained parameters for `model_cfg` (block_size cropped, param_dtype cast), placed on `shardings`."""
    dtype = np.dtype(model_cfg.param_dtype) if model_cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), pre.params)
    params["wpe"]["embedding"] = params["wpe"]["embedding"][: model_cfg.block_size]
    return jax.device_put(params, shardings)
