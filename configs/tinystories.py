"""TinyStories (Eldan & Li, 2023): short stories in simple English.

Sizes (`--config configs/tinystories.py:SIZE`):
  tiny    (default) 4 layers, 4 heads, 128 wide, block 128, sentencepiece BPE of 2048
          trained on the data: a CPU model that writes story-shaped English in minutes.
  small   8 layers, 8 heads, 256 wide, block 128, character-level: the ~6M model.
  medium  6 layers, 9 heads, 576 wide, block 512, GPT-2 BPE: ~53M.
  gpt2    12 layers, 12 heads, 768 wide, block 1024, GPT-2 BPE: GPT-2 small, 124M.
  tiny-modern  tiny's shape and training with the modern recipe (gptjax.config.apply_modern),
          at tiny's AdamW learning rate; the head stays tied.

Local copies under $GPTJAX_DATA_DIR/tinystories/{train,valid}.txt are used when
present; otherwise the hub dataset roneneldan/TinyStories.
"""

from gptjax.config import apply_modern, base_config, pick_size

SIZES = ("tiny", "small", "medium", "gpt2", "tiny-modern")


def get_config(size=None):
    size = pick_size(size, SIZES, "configs/tinystories.py")
    c = base_config()
    c.workdir = f"runs/tinystories-{size}"
    c.data.dataset = "tinystories"
    c.train.beta2, c.train.weight_decay, c.train.grad_clip = 0.99, 0.1, 1.0
    c.train.eval_every, c.train.eval_steps, c.train.log_every = 250, 20, 10
    if size in ("tiny", "tiny-modern"):
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 4, 4, 128, 128
        c.data.tokenizer, c.data.vocab_size = "sentencepiece", 2048
        c.train.steps, c.train.batch_size, c.train.lr, c.train.min_lr = 2000, 16, 2e-3, 2e-4
        c.train.warmup_steps = 100
        if size == "tiny-modern":
            apply_modern(c)
            # This corpus's AdamW rate: at 6e-3 the embeddings overfit the local sample (docs/modern.md).
            c.train.lr, c.train.min_lr = 2e-3, 2e-4
    elif size == "small":
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 8, 8, 256, 128
        c.model.dropout = 0.1
        c.data.tokenizer = "char"
        c.train.steps, c.train.batch_size, c.train.lr, c.train.min_lr = 5000, 64, 1e-3, 1e-4
        c.train.warmup_steps = 200
    else:
        c.data.tokenizer = "gpt2"
        if size == "medium":
            c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 6, 9, 576, 512
            c.train.batch_size, c.train.lr, c.train.min_lr = 64, 6e-4, 6e-5
        else:
            c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 12, 12, 768, 1024
            c.model.scan_layers = True  # GPT-2 sizes: one compiled block, one gathered layer at a time (docs/scan_layers.md)
            c.train.batch_size, c.train.lr, c.train.min_lr = 64, 6e-4, 6e-5
        c.train.steps, c.train.warmup_steps, c.train.beta2 = 20000, 1000, 0.95
        c.train.eval_every, c.train.eval_steps, c.train.checkpoint_every = 1000, 100, 1000
        c.model.dtype = "bfloat16"
    return c
