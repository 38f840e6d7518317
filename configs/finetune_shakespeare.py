"""Fine-tune OpenAI's GPT-2 on Tiny Shakespeare, as nanoGPT's finetune_shakespeare does.

`--config configs/finetune_shakespeare.py:SIZE` with SIZE one of gpt2 (default,
124M), gpt2-medium, gpt2-large, gpt2-xl: `train.init_from=hf:SIZE` downloads
the checkpoint once (or pass a local folder: `--config.train.init_from=hf:PATH`,
or a gptjax workdir such as one `gptjax.convert --from_hf` wrote). The model's
shape and its GPT-2 BPE tokenizer come from the checkpoint; the context is
cropped to 256 tokens (the position embeddings past it are dropped). A small
constant learning rate for a few hundred steps: the model adapts to the
text's style rather than relearning English.
"""

from gptjax.config import base_config, pick_size

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def get_config(size=None):
    size = pick_size(size, SIZES, "configs/finetune_shakespeare.py")
    c = base_config()
    c.workdir = f"runs/finetune-shakespeare-{size}"
    c.train.init_from = f"hf:{size}"
    c.model.scan_layers = True  # GPT-2 sizes (12-48 layers): one compiled block (docs/scan_layers.md)
    c.model.block_size = 256  # a crop of GPT-2's 1024 positions: cheaper steps, enough for dialogue
    c.data.dataset = "tinyshakespeare"  # data.tokenizer is left at its default: the checkpoint's is used
    c.train.steps, c.train.batch_size, c.train.grad_accum = 200, 8, 1
    c.train.lr = c.train.min_lr = 3e-5  # constant, as nanoGPT's decay_lr = False
    c.train.warmup_steps, c.train.weight_decay, c.train.beta2 = 0, 0.1, 0.99
    c.train.eval_every, c.train.eval_steps, c.train.log_every, c.train.checkpoint_every = 25, 20, 5, 100
    c.train.sample_prompt = "ROMEO:"
    return c
