"""Check an exported gptjax model against Hugging Face transformers (needs torch and transformers).

    python scripts/check_hf_export.py [--workdir runs/tiny] [--out /tmp/gptjax-hf]

Without --workdir it trains a small GPT-2-BPE model on Tiny Shakespeare for
a few steps (GPTJAX_DATA_DIR must hold tinyshakespeare/ and gpt2/). It exports
the model with `gptjax.convert --to_hf`, loads it with
`AutoModelForCausalLM.from_pretrained`, and compares the logits, a greedy
continuation, and AutoTokenizer's ids with ours on a few strings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

STRINGS = ["Hello world", "ROMEO:\nWhat light through yonder window breaks?", "  spaces\tand\ttabs  ",
           "naïve café, 日本語 and emoji 🙂", "a <|endoftext|> b", "1234567 + 89 = ?"]


def train_tiny(workdir: str) -> None:
    cmd = [sys.executable, "-m", "gptjax.train", "--config", "configs/tiny.py", f"--workdir={workdir}",
           "--config.data.tokenizer=gpt2", "--config.model.n_layer=2", "--config.model.n_head=4",
           "--config.model.n_embd=64", "--config.model.block_size=64", "--config.model.bias=True",
           "--config.model.qkv_bias=True", "--config.model.activation=gelu_tanh", "--config.train.steps=30",
           "--config.train.eval_every=30", "--config.train.eval_steps=2", "--config.train.batch_size=8",
           "--quiet"]
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a trained gptjax workdir (default: train a small one)")
    parser.add_argument("--out", help="export folder (default: a temporary one)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="gptjax-hf-check-")
    workdir = args.workdir or os.path.join(tmp, "run")
    out = args.out or os.path.join(tmp, "hf")
    if not args.workdir:
        train_tiny(workdir)
    subprocess.run([sys.executable, "-m", "gptjax.convert", f"--to_hf={out}", f"--workdir={workdir}",
                    "--overwrite"], check=True)

    import torch
    import transformers
    from flax import nnx

    from gptjax.decode import generate_ids
    from gptjax.workdir import load_run

    run = load_run(workdir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: loaded {type(hf_model).__name__} "
          f"({sum(p.numel() for p in hf_model.parameters()):,} parameters)")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, run.cfg.model.vocab_size, size=(2, run.cfg.model.block_size))
    ours = np.asarray(nnx.merge(run.graphdef, run.params)(ids))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    print(f"logits {ours.shape}: max |gptjax - transformers| = {np.abs(ours - theirs).max():.2e}")

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    print(f"tokenizer: {type(tokenizer).__name__}")
    same = 0
    for s in STRINGS:
        a, b = run.tokenizer.encode(s).tolist(), tokenizer(s)["input_ids"]
        same += a == b
        print(f"  {'same' if a == b else 'DIFFERENT'} ids for {s!r}: {a[:12]}{' ...' if len(a) > 12 else ''}"
              + ("" if a == b else f" vs {b[:12]}"))
    print(f"tokenizer: {same}/{len(STRINGS)} strings encode to the same ids")

    prompt_ids = run.tokenizer.encode("ROMEO:").tolist()
    new = 24
    ours_ids = generate_ids(run.graphdef, run.params, prompt_ids, seed=0, max_new_tokens=new, temperature=0.0).tolist()
    with torch.no_grad():
        hf_ids = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False,
                                   pad_token_id=run.tokenizer.eot_id)[0].tolist()
    if run.tokenizer.eot_id in ours_ids[len(prompt_ids):]:  # transformers stops after end-of-text
        ours_ids = ours_ids[: ours_ids.index(run.tokenizer.eot_id, len(prompt_ids)) + 1]
    greedy_same = ours_ids == hf_ids
    print(f"greedy, {new} new tokens from 'ROMEO:': gptjax {run.tokenizer.decode(ours_ids)!r}")
    print(f"greedy, {new} new tokens from 'ROMEO:': transformers {run.tokenizer.decode(hf_ids)!r}")
    print(f"greedy continuation: {'same ids' if greedy_same else 'DIFFERENT'}")
    ok = np.abs(ours - theirs).max() < 1e-4 and same == len(STRINGS) and greedy_same
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
