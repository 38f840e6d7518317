import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite never writes into the user's own cache (downloads, token files,
# tokenizers, compiled programs): every test, and every process a test starts,
# uses one temporary cache folder for the session.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gptjax-test-cache-")

# Tests build many small programs of the same shapes: each is compiled once per
# session (per worker process), in the test process and in every process it
# starts, even those given a cache folder of their own. The test process runs
# with the CPU settings of `gptjax.train` (runtime.configure).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["XDG_CACHE_HOME"], "jax-compiled")
from gptjax import runtime  # noqa: E402

runtime.configure()


# ----------------------------------------------------------------------------- tests that need 8 devices
# The CPU backend has 8 devices only when XLA_FLAGS asks for them before JAX
# starts, so the tests marked `eight_devices` (in any file) run together in one
# fresh pytest that test_sharding.py::test_eight_device_tests starts; in the
# outer pytest they are skipped, and inside it everything else is.
EIGHT_DEVICES = os.environ.get("GPTJAX_EIGHT_DEVICE_TESTS") == "1"


def eight_devices(test):
    """Marks a test that needs 8 devices (it runs inside test_eight_device_tests)."""
    skip = pytest.mark.skipif(not EIGHT_DEVICES, reason="runs inside test_eight_device_tests")
    return pytest.mark.eight_devices(skip(test))


def outer(test):
    """Marks an end-to-end test that starts processes of its own (slow; never inside the 8-device run)."""
    return pytest.mark.slow(pytest.mark.skipif(EIGHT_DEVICES, reason="starts processes of its own")(test))


def run_eight_device_tests():
    """Every `eight_devices` test of the suite, in one pytest whose JAX has 8 CPU devices: CompletedProcess."""
    env = dict(os.environ, GPTJAX_EIGHT_DEVICE_TESTS="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "eight_devices",
         os.path.join(ROOT, "tests")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def load_config(name: str, size: str | None = None):
    """`configs/<name>.py`'s get_config(size), loaded by path (configs/ is not a package)."""
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"gptjax_test_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40


STORIES = [  # four short documents, for the tests of document sources
    "Tom had a red ball. He threw it to his dog, and the dog ran after it.",
    "Mia found a shell on the beach.\nShe put it in her pocket and smiled.",
    "The cat sat on the mat. It was warm and sleepy in the sun.",
    "Ben built a tall tower of blocks. It fell, and he laughed and built it again.",
]


def write_folder(folder, texts=STORIES):
    """One .txt file per text (each repeated 8 times) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(t * 8, encoding="utf-8")
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return str(path)


def small_config(text_path, workdir, **overrides):
    """A model small enough for a test to train in seconds."""
    c = load_config("tiny")
    c.workdir = str(workdir)
    c.data.path = text_path
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 2, 2, 32, 16
    c.train.batch_size, c.train.steps, c.train.warmup_steps = 4, 20, 2
    c.train.eval_every, c.train.eval_steps, c.train.log_every, c.train.checkpoint_every = 10, 2, 5, 10
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def run_cli(*args, env=None, timeout=300, cwd=ROOT):
    """Run `python -m <args>` (from the project root unless `cwd`); returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def shared_data_dir():
    d = os.environ.get("GPTJAX_DATA_DIR")
    return d if d and os.path.isdir(d) else None


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A small character model trained for 60 steps (newest checkpoints at 40, 50, 60), shared by sample/eval tests."""
    from gptjax.trainer import build as Run

    root = tmp_path_factory.mktemp("trained")
    text = root / "corpus.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    cfg = small_config(str(text), root / "run")
    cfg.train.steps = 60
    Run(cfg, cfg.workdir, quiet=True).train()
    return cfg.workdir


def tree_snapshot(path) -> dict:
    """Every file under `path` with its content hash: to prove nothing changed."""
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                out[os.path.relpath(f, path)] = hashlib.sha256(fh.read()).hexdigest()
        else:
            out[os.path.relpath(f, path)] = "dir"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, trained in-process to step 6 with checkpoints at 2, 4 and 6: (trainer, text, workdir)."""
    from gptjax.trainer import build

    base = tmp_path_factory.mktemp("trained")
    text = base / "corpus.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    cfg = small_config(str(text), base / "run", **{"train.steps": 6, "train.checkpoint_every": 2,
                                                   "train.eval_every": 2, "train.log_every": 1})
    run = build(cfg, cfg.workdir, quiet=True)
    run.train()
    return run, str(text), str(base / "run")


def copy_run(src, dest) -> str:
    shutil.copytree(src, dest)
    return str(dest)


def load_params(workdir):
    """(params, step) of the newest checkpoint in `workdir`, as saved (no model needed)."""
    import orbax.checkpoint as ocp

    from gptjax.checkpoint import Checkpointer
    from gptjax.workdir import Workdir

    ckpt = Checkpointer(Workdir(str(workdir)).checkpoints, create=False, async_save=False)
    step = ckpt.latest_step()
    params = ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    ckpt.close()
    return params, step


def assert_same_params(a, b):
    import jax
    import numpy as np

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def tiny_model(**overrides):
    """(model section, GPT) of a 2-layer, 2-head, 32-wide model with a 34-token vocabulary."""
    from flax import nnx

    from gptjax import config as config_lib
    from gptjax import model as model_lib

    cfg = config_lib.base_config().model
    cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size = 2, 2, 32, 16, 34
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, model_lib.GPT(cfg, rngs=nnx.Rngs(0))
