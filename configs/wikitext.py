"""WikiText (Merity et al., 2016): Good and Featured Wikipedia articles.

Sizes (`--config configs/wikitext.py:SIZE`):
  tiny    (default) 4 layers, 4 heads, 128 wide, block 128, sentencepiece BPE of 4096
          on WikiText-2: a CPU model in minutes.
  small   6 layers, 6 heads, 384 wide, block 256, sentencepiece BPE of 28000 on
          WikiText-2 (the size of the WordPiece vocabulary WikiText models often use).
  gpt2    12 layers, 12 heads, 768 wide, block 1024, GPT-2 BPE on WikiText-103: 124M.

Local copies under $GPTJAX_DATA_DIR/wikitext-2/{train,valid}.txt (or
wikitext-103/) are used when present; otherwise the hub dataset
Salesforce/wikitext. The text is WikiText's tokenized variant (`<unk>` for
rare words); each line is a paragraph, so lines are kept and no end-of-text
token is inserted between them.
"""

from gptjax.config import base_config, pick_size

SIZES = ("tiny", "small", "gpt2")


def get_config(size=None):
    size = pick_size(size, SIZES, "configs/wikitext.py")
    c = base_config()
    c.workdir = f"runs/wikitext-{size}"
    c.data.dataset = "wikitext2"
    c.train.beta2 = 0.99
    c.train.eval_every, c.train.eval_steps, c.train.log_every = 250, 20, 10
    if size == "tiny":
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 4, 4, 128, 128
        c.data.tokenizer, c.data.vocab_size = "sentencepiece", 4096
        c.train.steps, c.train.batch_size, c.train.lr, c.train.min_lr = 2000, 16, 2e-3, 2e-4
    elif size == "small":
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 6, 6, 384, 256
        c.model.dropout = 0.2
        c.data.tokenizer, c.data.vocab_size = "sentencepiece", 28000
        c.train.steps, c.train.batch_size, c.train.lr, c.train.min_lr = 10000, 32, 6e-4, 6e-5
        c.train.warmup_steps = 500
    else:
        c.data.dataset, c.data.tokenizer = "wikitext103", "gpt2"
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 12, 12, 768, 1024
        c.model.scan_layers = True  # GPT-2 sizes: one compiled block, one gathered layer at a time (docs/scan_layers.md)
        c.model.dtype = "bfloat16"
        c.train.steps, c.train.batch_size, c.train.lr, c.train.min_lr = 50000, 64, 6e-4, 6e-5
        c.train.warmup_steps, c.train.beta2 = 2000, 0.95
        c.train.eval_every, c.train.eval_steps, c.train.checkpoint_every = 1000, 100, 1000
    return c
