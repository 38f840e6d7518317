"""Process-wide settings that make small models train fast; call before JAX starts.

Two things dominate a small model's step on a CPU besides the arithmetic:

- Allocation churn. XLA's CPU runtime allocates its temporary buffers with
  malloc on every step. glibc hands blocks above its mmap threshold straight
  back to the kernel and trims the heap when its top frees up, so every step
  maps fresh pages and takes a page fault on each one (for the tiny config,
  about 13,000 faults and a third of the step's CPU time spent in the
  kernel). Raising the mmap and trim thresholds keeps those pages in the
  process and reuses them.
- How XLA runs its matmuls on CPU (`CPU_XLA_FLAGS`, measured in BENCHMARKS.md).

`configure()` also turns on JAX's persistent compilation cache, so a second
run of the same config skips compilation.
"""

from __future__ import annotations

import ctypes
import os
import sys

# XLA flags for the host CPU backend; they do not affect GPU or TPU code.
# YNNPACK matmuls: on the tiny config they cut the step's CPU time by about a
# third against XLA's default (Eigen) matmuls, with the same losses. YNNPACK
# reductions: XLA's own CPU reductions over more than 32 elements are split
# into a windowed reduction and a second pass, each a separate unfused kernel
# (LayerNorm and softmax statistics, about 60 of them per tiny-config step).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Stop glibc returning freed buffers to the kernel after every step; True if applied.

    One arena: a thread arena's heap cannot grow past 64 MiB, and XLA's
    per-step temporary buffer (one block for the whole program) is larger
    than that for all but the smallest models, which would send it back to
    mmap whenever a worker thread allocates it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave the allocator alone
        return False
    results = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold),
               libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)]
    return all(r == 1 for r in results)


def add_xla_flags(flags) -> None:
    """Append XLA flags the user has not set; effective only before the backend starts."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags if f.split("=")[0] not in names]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def cache_dir() -> str:
    """gptjax's cache folder (downloads, token files, compiled programs): $XDG_CACHE_HOME/gptjax."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gptjax")


DATA_DIR_ENV = "GPTJAX_DATA_DIR"  # a folder of local copies of datasets (and GPT-2's BPE ranks)


def data_file(*parts: str) -> str | None:
    """The absolute path of $GPTJAX_DATA_DIR/parts..., or None when it is not there."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        path = os.path.join(data_dir, *parts)
        if os.path.exists(path):
            return os.path.abspath(path)
    return None


def compilation_cache_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR when the user set it (JAX's own setting wins), else gptjax's cache/jax."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "jax")


def enable_compilation_cache(path: str | None = None) -> str:
    import jax

    path = path or compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program, however quick to compile: a run's start-up is many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def configure(compilation_cache: bool = True) -> None:
    keep_freed_memory()
    add_xla_flags(CPU_XLA_FLAGS)
    if compilation_cache:
        enable_compilation_cache()
