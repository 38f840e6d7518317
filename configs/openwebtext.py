"""OpenWebText with the GPT-2 tokenizer: nanoGPT's reproduction of GPT-2.

Sizes (`--config configs/openwebtext.py:SIZE`):
  gpt2    (default) 12 layers, 12 heads, 768 wide, block 1024: 124M. Batch 480
          sequences (~0.5M tokens), 600k steps, lr 6e-4 -> 6e-5, warm-up 2000,
          beta2 0.95, as nanoGPT's train_gpt2.py. Needs accelerators.
  small   6 layers, 6 heads, 384 wide, block 512: ~30M, for a single GPU.

The hub dataset Skylion007/openwebtext has only a train split; 0.05% of its
documents (fixed seed) are cut off for validation, as nanoGPT does. A local
folder $GPTJAX_DATA_DIR/openwebtext/ of .txt/.jsonl/.parquet files is used
when present.
"""

from gptjax.config import base_config, pick_size

SIZES = ("gpt2", "small")


def get_config(size=None):
    size = pick_size(size, SIZES, "configs/openwebtext.py")
    c = base_config()
    c.workdir = f"runs/openwebtext-{size}"
    c.data.dataset, c.data.tokenizer, c.data.val_fraction = "openwebtext", "gpt2", 0.0005
    c.model.dtype = "bfloat16"
    c.train.lr, c.train.min_lr, c.train.beta2, c.train.weight_decay = 6e-4, 6e-5, 0.95, 0.1
    c.train.eval_every, c.train.eval_steps, c.train.checkpoint_every = 1000, 200, 1000
    if size == "gpt2":
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 12, 12, 768, 1024
        c.train.steps, c.train.batch_size, c.train.warmup_steps = 600_000, 480, 2000
        c.model.scan_layers = True  # GPT-2 sizes: one compiled block, one gathered layer at a time (docs/scan_layers.md)
    else:
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 6, 6, 384, 512
        c.train.steps, c.train.batch_size, c.train.warmup_steps = 50_000, 64, 1000
    return c
