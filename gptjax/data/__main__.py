"""`python -m gptjax.data --config configs/tinystories.py [--workdir DIR]`

Prepares a config's data (download, tokenizer training, tokenization into the
token cache) without training, and prints the token counts.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax import config as config_lib
from gptjax import workdir as workdir_lib
from gptjax.data.cache import Prepared, prepare
from gptjax.errors import UserError, exit_with

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Also save the tokenizer in this run folder.")


def describe(p: Prepared) -> list[str]:
    lines = [f"source: {p.source.label}; tokenizer {p.tokenizer.kind}, vocab {p.tokenizer.vocab_size}"]
    for split, s in p.stats.items():
        lines.append(f"{split:>5}: {s['tokens']:>12,} tokens  {s['chars']:>13,} characters  {s['bytes']:>13,} bytes  "
                     f"{s['docs']:>9,} rows  {s['chars'] / max(1, s['tokens']):.2f} characters/token")
    return lines


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        exit_with(UserError(f"unexpected arguments {argv[1:]}; config keys go as --config.SECTION.KEY=VALUE."))
    try:
        config = _CONFIG.value
        config_lib.validate(config)
        wd = workdir_lib.Workdir(_WORKDIR.value) if _WORKDIR.value else None
        p = prepare(config, *(workdir_lib.kept_tokenizer(wd) if wd else (None, None)))
        if wd:
            workdir_lib.save_tokenizer(wd, p.tokenizer, p.data_id)
        for line in describe(p):
            print(line, flush=True)
    except UserError as e:
        exit_with(e)


def run_main():
    config_lib.find_config_files(sys.argv)
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
