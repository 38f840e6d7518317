"""gptjax.convert: importing a Hugging Face GPT-2 folder as a workdir, exporting a workdir for transformers."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gptjax import convert
from gptjax.errors import UserError
from gptjax.sample import load_run

from conftest import run_cli, shared_data_dir

DATA = shared_data_dir()
TINY = os.path.join(DATA, "hf-gpt2-tiny") if DATA else None
pytestmark = pytest.mark.skipif(not (TINY and os.path.isdir(TINY)), reason="needs $GPTJAX_DATA_DIR/hf-gpt2-tiny")
quiet = lambda *a: None


def reference():
    with open(os.path.join(TINY, "reference.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("import") / "gpt2-tiny")
    convert.import_hf(TINY, workdir, log=quiet)
    return workdir


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def test_import_writes_a_workdir_whose_model_gives_the_reference_logits(imported):
    from flax import nnx

    assert {"config.json", "tokenizer", "checkpoints"} <= set(os.listdir(imported))
    run = load_run(imported)
    assert run.step == 0 and run.cfg.model.activation == "gelu_tanh" and run.tokenizer.vocab_size == 211
    logits = nnx.merge(run.graphdef, run.params)(np.asarray(reference()["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), np.load(os.path.join(TINY, "reference_logits.npy")), atol=2e-5)


def test_export_writes_back_bitwise_the_tensors_transformers_saved(imported, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "hf"
    convert.export_hf(imported, str(out), log=quiet)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(os.path.join(TINY, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["n_head"] == 3

    again = tmp_path / "again"  # and the round trip back gives the same parameters
    convert.import_hf(str(out), str(again), log=quiet)
    for a, b in zip(jax.tree.leaves(load_run(imported).params), jax.tree.leaves(load_run(str(again)).params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_export_of_a_trained_char_model(trained_workdir, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "hf"
    convert.export_hf(trained_workdir, str(out), log=quiet)
    cfg = load_run(trained_workdir).cfg
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["transformer.wte.weight"].shape == (cfg.model.vocab_size, cfg.model.n_embd)
    assert not tensors["transformer.h.0.attn.c_attn.bias"].any()  # the tiny config has no biases: zeros
    back = tmp_path / "back"
    convert.import_hf(str(out), str(back), log=quiet)
    run, again = load_run(trained_workdir), load_run(str(back))
    assert again.cfg.model.bias is False  # the bias flags travel in config.json
    assert again.tokenizer.chars == run.tokenizer.chars  # and the characters in tokenizer.json
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(again.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- bad input: one clear error, nothing written

def fixture_copy(tmp_path, **config_changes):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY, folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("make, needle", [
    (lambda t: t, "has no config.json"),
    (lambda t: fixture_copy(t, model_type="llama"), "llama model"),
    (lambda t: (os.remove(fixture_copy(t) / "model.safetensors"),
                (t / "ckpt" / "pytorch_model.bin").write_bytes(b"PK\x03\x04"), t / "ckpt")[-1],
     "only as pytorch_model.bin"),
    (lambda t: fixture_copy(t, n_embd=48), "do not match its config.json"),
])
def test_bad_import_is_one_clear_error_and_writes_nothing(tmp_path, make, needle):
    src_root = tmp_path / "src"
    src_root.mkdir()
    source = make(src_root)
    workdir = tmp_path / "out" / "w"
    before = listing(tmp_path)
    with pytest.raises(UserError, match=needle):
        convert.import_hf(str(source), str(workdir), log=quiet)
    assert listing(tmp_path) == before


def test_import_never_writes_into_a_workdir_that_holds_something(imported, tmp_path):
    before = listing(imported)
    with pytest.raises(UserError, match="not empty"):
        convert.import_hf(TINY, imported, log=quiet)
    assert listing(imported) == before


def test_export_into_a_nonempty_folder_needs_overwrite(imported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        convert.export_hf(imported, str(out), log=quiet)
    assert os.listdir(out) == ["keep.txt"]
    convert.export_hf(imported, str(out), overwrite=True, log=quiet)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left


def test_export_of_a_workdir_without_a_checkpoint_is_refused(imported, tmp_path):
    workdir = tmp_path / "empty"
    shutil.copytree(imported, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(UserError, match="checkpoint"):
        convert.export_hf(str(workdir), str(tmp_path / "out"), log=quiet)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the command line

@pytest.mark.slow
def test_cli_import_then_greedy_sampling_gives_transformers_greedy_output(tmp_path):
    workdir = tmp_path / "w"
    proc = run_cli("gptjax.convert", f"--from_hf={TINY}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout
    ref = reference()
    prompt = "".join(map(chr, ref["greedy_prompt"]))  # the import's ids are code points: no tokenizer shipped
    new = len(ref["greedy_output"]) - len(ref["greedy_prompt"])
    out = run_cli("gptjax.sample", f"--workdir={workdir}", f"--prompt={prompt}", "--temperature=0",
                  f"--max_new_tokens={new}")
    assert out.returncode == 0, out.stderr
    assert [ord(c) for c in out.stdout.rstrip("\n")] == ref["greedy_output"]
    ev = run_cli("gptjax.eval", f"--workdir={workdir}", "--max_windows=4")
    assert ev.returncode == 0, ev.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--from_hf=/nonexistent/folder", "--workdir=W"], "is not a folder"),
    (["--from_hf=gpt2", "--workdir=W"], "offline"),
    (["--to_hf=OUT", "--workdir=W"], "does not exist"),
    (["--workdir=W"], "exactly one of"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    args = [a.replace("W", str(tmp_path / "w")).replace("OUT", str(tmp_path / "out")) for a in args]
    proc = run_cli("gptjax.convert", *args, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr.lower(), proc.stderr
    assert os.listdir(tmp_path) == []
