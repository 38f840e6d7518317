"""gptjax.hf: the pure GPT-2 <-> gptjax mapping, checked against a checkpoint saved by transformers."""

import json
import re
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config as config_lib
from gptjax import hf
from gptjax import model as model_lib
from gptjax.errors import UserError

from conftest import shared_data_dir

DATA = shared_data_dir()
TINY = os.path.join(DATA, "hf-gpt2-tiny") if DATA else None
needs_tiny = pytest.mark.skipif(not (TINY and os.path.isdir(TINY)), reason="needs $GPTJAX_DATA_DIR/hf-gpt2-tiny")


def model_cfg(**kw):
    m = config_lib.base_config().model
    m.update(dict(n_layer=2, n_head=3, n_embd=24, block_size=16, vocab_size=37, bias=True, qkv_bias=True,
                  activation="gelu_tanh"), **kw)
    return m


def random_params(m, seed=0):
    """A model's parameters, every leaf random (biases and LayerNorm scales too)."""
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model_lib.GPT(m, rngs=nnx.Rngs(0)))))
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [rng.normal(size=l.shape).astype(np.float32) for l in leaves])


def hf_config(**kw):
    with open(os.path.join(TINY, "config.json")) as f:
        return {**json.load(f), **kw}


@needs_tiny
def test_tiny_gpt2_saved_by_transformers_gives_its_reference_logits():
    from safetensors.numpy import load_file

    with open(os.path.join(TINY, "config.json")) as f:
        m = config_lib.base_config().model
        m.update(hf.model_config_from_hf(json.load(f), TINY))
    assert m.activation == "gelu_tanh" and m.n_head == 3 and m.bias and m.qkv_bias and m.tie_embeddings
    params = hf.params_from_hf(load_file(os.path.join(TINY, "model.safetensors")), m, TINY)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.GPT(m, rngs=nnx.Rngs(0))))
    with open(os.path.join(TINY, "reference.json")) as f:
        ids = np.asarray(json.load(f)["input_ids"])
    logits = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))(ids)
    np.testing.assert_allclose(np.asarray(logits), np.load(os.path.join(TINY, "reference_logits.npy")), atol=2e-5)


@pytest.mark.parametrize("kw", [{}, {"bias": False, "qkv_bias": False, "tie_embeddings": False},
                                {"bias": False, "qkv_bias": True, "activation": "relu"}])
def test_export_then_import_gives_bitwise_the_same_parameters(kw):
    m = model_cfg(**kw)
    params = random_params(m)
    tensors = hf.params_to_hf(params, m)
    back_cfg = config_lib.base_config().model
    back_cfg.update(hf.model_config_from_hf(json.loads(json.dumps(hf.hf_config_from_model(m))), "out"))
    assert {k: back_cfg[k] for k in hf.SHAPE_KEYS} == {k: m[k] for k in hf.SHAPE_KEYS}
    back = hf.params_from_hf(tensors, back_cfg, "out")
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    if not m.bias:
        assert not tensors["transformer.h.0.mlp.c_fc.bias"].any()  # missing biases are written as zeros


def test_qkv_columns_go_from_q_k_v_blocks_to_head_major():
    m = model_cfg()
    params = random_params(m)
    H, hd, D = m.n_head, m.n_embd // m.n_head, m.n_embd
    ours = params["blocks"][0]["attn"]["qkv"]["kernel"].reshape(D, H, 3, hd)
    theirs = hf.params_to_hf(params, m)["transformer.h.0.attn.c_attn.weight"].reshape(D, 3, H, hd)
    for h in range(H):
        for j in range(3):  # q, k, v
            np.testing.assert_array_equal(ours[:, h, j], theirs[:, j, h])


def test_gelu_tanh_is_gpt2s_gelu_new():
    m = model_cfg()
    mlp = model_lib.MLP(m, rngs=nnx.Rngs(0))
    x = jnp.linspace(-4, 4, 5 * m.n_embd).reshape(5, m.n_embd)
    h = mlp.fc(x)
    gelu_new = 0.5 * h * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    hidden = model_lib.ACTIVATION_FNS[m.activation](h)
    np.testing.assert_allclose(hidden, gelu_new, atol=1e-6)
    assert np.abs(hidden - jax.nn.gelu(h, approximate=False)).max() > 1e-5  # not the exact GELU


@needs_tiny
@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llama"}, "llama model"),
    ({"activation_function": "silu"}, "activation_function 'silu'"),
    ({"n_inner": 100}, "n_inner=100"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
])
def test_a_config_we_cannot_run_is_one_clear_error(change, needle):
    with pytest.raises(UserError, match=needle):
        hf.model_config_from_hf(hf_config(**change), "ckpt")


def test_weights_that_do_not_fit_the_config_are_named():
    m = model_cfg()
    tensors = hf.params_to_hf(random_params(m), m)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:8]
    with pytest.raises(UserError, match=r"missing transformer\.h\.1\.mlp\.c_fc\.weight.*wrong shapes: transformer\.wpe"):
        hf.params_from_hf(tensors, m, "ckpt")


def test_an_activation_gpt2_lacks_is_refused_on_export_naming_the_key():
    with pytest.raises(UserError, match="model.activation='swish'"):
        hf.hf_config_from_model(model_cfg(activation="swish"))


def test_exported_config_is_what_transformers_reads():
    c = hf.hf_config_from_model(model_cfg(activation="gelu", tie_embeddings=False), eot_id=5)
    assert c["model_type"] == "gpt2" and c["architectures"] == ["GPT2LMHeadModel"]
    assert c["activation_function"] == "gelu" and c["tie_word_embeddings"] is False
    assert (c["n_positions"], c["n_embd"], c["n_layer"], c["n_head"], c["vocab_size"]) == (16, 24, 2, 3, 37)
    assert c["eos_token_id"] == 5 and c["layer_norm_epsilon"] == 1e-5


@pytest.mark.skipif(not (DATA and os.path.isfile(os.path.join(DATA, "gpt2", "r50k_base.tiktoken"))),
                    reason="needs $GPTJAX_DATA_DIR/gpt2/r50k_base.tiktoken")
def test_gpt2_vocab_json_and_merges_txt_come_from_the_bpe_ranks():
    from gptjax.tokenizers import GPT2Tokenizer

    tok = GPT2Tokenizer.load()
    assert tok.encode("Hello world").tolist() == [15496, 995]
    files, note = hf.tokenizer_files(tok, 1024)
    vocab, merges = json.loads(files["vocab.json"]), files["merges.txt"].splitlines()
    assert note is None and len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    assert vocab["Hello"] == 15496 and vocab["\u0120world"] == 995 and vocab["!"] == 0
    assert merges[:4] == ["#version: 0.2", "\u0120 t", "\u0120 a", "h e"] and len(merges) == 50001
    # Every merge joins two tokens into the token of the next rank.
    for r, line in zip(range(256, 50256), merges[1:]):
        a, b = line.split(" ")
        assert vocab[a] < r and vocab[b] < r and vocab[a + b] == r
    assert hf.tokenizer_for_import({"vocab.json": files["vocab.json"]}, 50257, lambda: vocab, "x") == ("gpt2", None)


def test_char_tokenizer_json_gives_our_ids():
    from gptjax.tokenizers import CharTokenizer

    tok = CharTokenizer("hello world\n")
    files, note = hf.tokenizer_files(tok, 16)
    spec = json.loads(files["tokenizer.json"])
    assert spec["model"]["vocab"] == {ch: i for i, ch in enumerate(tok.chars)} and spec["model"]["merges"] == []
    assert "dropped" in note
    assert hf.tokenizer_for_import(files, tok.vocab_size, None, "x") == ("char", tok.chars)


def test_tokenizer_of_an_import():
    assert hf.tokenizer_for_import({}, 50257, None, "x") == ("gpt2", None)
    assert hf.tokenizer_for_import({}, 3, None, "x") == ("char", ["\x00", "\x01", "\x02"])
    other = {"vocab.json": json.dumps({"ab": 0, "b": 1})}
    with pytest.raises(UserError, match="not GPT-2's BPE"):
        hf.tokenizer_for_import(other, 2, lambda: {"!": 0}, "x")


def test_an_export_of_switches_gpt2_cannot_represent_is_one_clear_error():
    assert hf.gpt2_incompatible(model_cfg()) == []
    assert hf.gpt2_incompatible(model_cfg(zero_init_proj=True, activation="relu")) == []  # both exist in GPT-2
    modern = model_cfg(position="rope", norm="rmsnorm", qk_norm=True, logit_softcap=30.0, activation="relu2")
    bad = ["model.position='rope'", "model.norm='rmsnorm'", "model.qk_norm=True", "model.logit_softcap=30.0",
           "model.activation='relu2'"]
    assert hf.gpt2_incompatible(modern) == bad
    with pytest.raises(UserError, match="cannot be exported as GPT-2: " + re.escape(", ".join(bad))):
        hf.hf_config_from_model(modern)
