import pytest

from conftest import load_config


def test_configs_have_the_documented_sizes():
    from flax import nnx

    from gptjax import model as model_lib
    from gptjax import params as params_lib

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
        assert params_lib.count_params(nnx.to_pure_dict(nnx.state(abstract))) == n, (name, size)
    with pytest.raises(ValueError, match="sizes: tiny, small"):
        load_config("tinystories", "huge")
