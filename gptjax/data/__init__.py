"""Text sources -> token id arrays (cached on disk) -> batches.

`sources`: where the text comes from and loading it with `datasets`;
`cache`: tokenizing it once into memory-mapped files (`prepare`);
`batches`: the windows a step trains or evaluates on.
`python -m gptjax.data --config ...` prepares a config's data without training.
"""

from gptjax.data.batches import (EVAL_TRAIN_STREAM, EVAL_VAL_STREAM, TRAIN_STREAM, check_length, eval_windows,
                                 get_batch, window_offsets)
from gptjax.data.cache import Prepared, prepare
from gptjax.data.sources import Source, resolve_source

__all__ = ["EVAL_TRAIN_STREAM", "EVAL_VAL_STREAM", "TRAIN_STREAM", "check_length", "eval_windows", "get_batch",
           "window_offsets", "Prepared", "prepare", "Source", "resolve_source"]
