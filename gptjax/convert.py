"""Hugging Face GPT-2 in and out of gptjax.

    python -m gptjax.convert --from_hf gpt2 --workdir runs/gpt2          # a hub name or a local folder
    python -m gptjax.convert --to_hf out/tiny --workdir runs/tiny [--overwrite]

Import writes a normal workdir (config.json, the tokenizer, an orbax
checkpoint at step 0 with a fresh optimizer state), so `gptjax.sample`,
`gptjax.eval` and `gptjax.train` (which continues from it) work on it.
Export writes `config.json`, `model.safetensors` and tokenizer files that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads as
GPT2LMHeadModel. Both write into a temporary folder and rename it when
complete: bad input or a failure midway leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from absl import app, flags, logging

from gptjax import config as config_lib
from gptjax import hf
from gptjax import init_from
from gptjax import params as params_lib
from gptjax.checkpoint import Checkpointer
from gptjax.errors import UserError, exit_with
from gptjax.steps import make_optimizer
from gptjax.workdir import Workdir, write_config

def define_flags() -> None:
    """The command line's flags (defined when it runs: importing this module defines none)."""
    flags.DEFINE_string("from_hf", None, "Import: a Hugging Face GPT-2 checkpoint folder or hub name.")
    flags.DEFINE_string("to_hf", None, "Export: the folder to write for transformers.")
    flags.DEFINE_string("workdir", None, "The gptjax workdir to write (--from_hf) or read (--to_hf).")
    flags.DEFINE_bool("overwrite", False, "--to_hf: replace what OUT holds.")


def _fresh_folder(path: str) -> str:
    """A new temporary sibling of `path`, on the same file system so that a rename completes the write."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _is_nonempty(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def _publish(tmp: str, path: str) -> None:
    """Move the finished folder into place (an empty or absent `path` only; the caller cleared it)."""
    if os.path.isdir(path):
        os.rmdir(path)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- import

def import_config(pre: init_from.Pretrained, workdir: str):
    """The resolved run config of an imported model: our defaults with its shape and tokenizer."""
    cfg = config_lib.base_config()
    with cfg.unlocked():
        cfg.model.update(pre.model)
        cfg.workdir = workdir
        cfg.data.tokenizer = pre.tokenizer.kind
    config_lib.validate(cfg)
    return cfg


def import_hf(source: str, workdir: str, log=print) -> None:
    """Write a workdir holding the Hugging Face GPT-2 checkpoint `source` at step 0."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file; give a new folder.")
    if _is_nonempty(workdir):
        raise UserError(f"--workdir {workdir} exists and is not empty; import into a new folder "
                        "(a workdir is never overwritten).")
    pre = init_from.read_hf(source)  # every check happens here, before anything is written
    cfg = import_config(pre, workdir)
    tx, _ = make_optimizer(cfg.train)
    params = jax.tree.map(jax.numpy.asarray, pre.params)
    tmp = _fresh_folder(workdir)
    try:
        wd = Workdir(tmp)
        write_config(wd, cfg)
        pre.tokenizer.save(wd.tokenizer)
        ckpt = Checkpointer(wd.checkpoints, keep=cfg.train.keep_checkpoints, async_save=False)
        try:
            ckpt.save(0, params, tx.init(params), {"step": 0, "imported_from": source})
        finally:
            ckpt.close()
        _publish(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = cfg.model
    log(f"imported {source}: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, "
        f"vocab {m.vocab_size} ({pre.tokenizer.kind} tokenizer), {m.activation}")
    log(f"  workdir {workdir} (checkpoint at step 0). Next: python -m gptjax.sample --workdir {workdir}")


# ----------------------------------------------------------------------------- export

def export_hf(workdir: str, out: str, overwrite: bool = False, log=print) -> None:
    """Write the newest checkpoint of `workdir` as a transformers GPT-2 folder at `out`."""
    from gptjax.workdir import load_run  # the one loader of a run's config, tokenizer and checkpoint

    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--to_hf {out} is a file; give a folder.")
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise UserError("--to_hf must be another folder than --workdir.")
    if _is_nonempty(out) and not overwrite:
        raise UserError(f"--to_hf {out} exists and is not empty; pass --overwrite to replace it, "
                        "or give a new folder.")
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} does not exist.")
    run = load_run(workdir)
    if run.quantized != "none":
        raise UserError(f"{workdir} holds an {run.quantized} quantized model; export the float workdir.")
    m = run.cfg.model
    config = hf.hf_config_from_model(m, run.tokenizer.eot_id)
    # HF keeps one tensor per layer: a scanned model's stacked blocks are split first.
    tensors = hf.params_to_hf(params_lib.unstack_layers(jax.device_get(run.params)), m)
    files, note = hf.tokenizer_files(run.tokenizer, m.block_size)
    from safetensors.numpy import save_file

    tmp = _fresh_folder(out)
    try:
        with open(os.path.join(tmp, hf.HF_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": run.tokenizer.eot_id, "eos_token_id": run.tokenizer.eot_id}, f, indent=2)
        save_file(tensors, os.path.join(tmp, hf.HF_WEIGHTS_FILE), metadata={"format": "pt"})
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.isdir(out):
            shutil.rmtree(out)  # only with --overwrite (checked above), once the new folder is complete
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(int(np.prod(t.shape)) for t in tensors.values())
    log(f"exported step {run.step} of {workdir} to {out}: GPT2LMHeadModel, {n:,} parameters, "
        f"activation_function={config['activation_function']}, tie_word_embeddings={config['tie_word_embeddings']}")
    if note:
        log(f"  note: {note}")
    log(f"  load it: transformers.AutoModelForCausalLM.from_pretrained({out!r})")


# ----------------------------------------------------------------------------- command line

def main(argv):
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # orbax logs every save and read
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; flags go as --name=value.")
        if (FLAGS.from_hf is None) == (FLAGS.to_hf is None):
            raise UserError("give exactly one of --from_hf PATH_OR_NAME (import) or --to_hf OUT (export).")
        if not FLAGS.workdir:
            raise UserError("--workdir is required: the gptjax workdir to write (--from_hf) or read (--to_hf).")
        if FLAGS.from_hf is not None:
            if FLAGS.overwrite:
                raise UserError("--overwrite applies to --to_hf only; an import never replaces a workdir.")
            import_hf(FLAGS.from_hf, FLAGS.workdir)
        else:
            export_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.overwrite)
    except UserError as e:
        exit_with(e)


def run_main():
    define_flags()
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
