"""nanoGPT's GPU-sized character model of Tiny Shakespeare (10.7M parameters).

6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2, 5000 steps,
lr 1e-3 decaying to 1e-4, beta2 0.99. A few minutes on one GPU; far longer
on a CPU.

`--config configs/shakespeare.py:bpe` is the ~3.5M BPE model instead: a
sentencepiece BPE of 500 tokens trained on the text; 5 layers, 6 heads, 240
wide, block 256.
"""

from gptjax.config import base_config, pick_size


def get_config(size=None):
    size = pick_size(size, ("char", "bpe"), "configs/shakespeare.py")
    c = base_config()
    c.workdir = "runs/shakespeare"
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 6, 6, 384, 256
    c.model.dropout = 0.2
    c.train.steps, c.train.batch_size = 5000, 64
    c.train.lr, c.train.min_lr, c.train.warmup_steps, c.train.beta2 = 1e-3, 1e-4, 100, 0.99
    c.train.eval_every, c.train.eval_steps = 250, 200
    c.train.checkpoint_every = 1000
    c.data.dataset, c.data.tokenizer = "tinyshakespeare", "char"
    if size == "bpe":
        c.workdir = "runs/shakespeare-bpe"
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 5, 6, 240, 256
        c.data.tokenizer, c.data.vocab_size = "sentencepiece", 500
    return c
