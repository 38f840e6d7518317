"""The pure core of training: the loss, the optimizer, the train state and the compiled steps.

Nothing here reads or writes files. `bench`, the trainer and the tests build
their steps from these functions:

    setup = init_train_state(cfg, mesh)          # params, optimizer state, shardings
    train_step = make_train_step(setup, cfg)
    state, out = train_step(setup.state, x_BxT, y_BxT)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import faults
from gptjax import model as model_lib
from gptjax import params as params_lib
from gptjax import sharding


def token_losses(logits_BxTxV, targets_BxT):
    """Cross-entropy of every position, float32 [B, T]: the one loss of training, evaluation and diagnostics."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)


def loss_fn(graphdef, params, x, y, dropout_key=None, gather_layer=None):
    """Mean token loss of the model `graphdef` + `params` on one batch."""
    return token_losses(nnx.merge(graphdef, params)(x, dropout_key=dropout_key, gather_layer=gather_layer), y).mean()


def _schedule(t, peak: float):
    """Linear warm-up to `peak`, then cosine decay to peak * min_lr / lr."""
    decay_steps = max(t.decay_steps or t.steps, t.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=t.warmup_steps,
        decay_steps=decay_steps, end_value=peak * t.min_lr / t.lr,
    )


def is_hidden_matrix(path) -> bool:
    """A Dense kernel inside the blocks (attention qkv/proj, MLP fc/proj): what Muon updates."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return names[0] == "blocks" and names[-1] == "kernel"


def make_optimizer(t):
    """The optimizer of `train.optimizer` and the schedule it logs (of train.lr); returns (optimizer, schedule).

    adamw: AdamW with linear warm-up then cosine decay to min_lr. Weight decay
    applies to matrices (Dense kernels, token and position embeddings), as in
    nanoGPT; never to biases or norm scales.

    muon: `optax.contrib.muon` (momentum train.muon_beta, Nesterov,
    train.muon_ns_steps Newton-Schulz steps) on the blocks' Dense kernels at peak train.muon_lr,
    and the AdamW above on everything else (embeddings, the head, norms,
    biases) at train.lr; both follow the same warm-up + cosine shape, each
    from its own peak. Under FSDP or tensor sharding the Muon momentum is laid
    out like its weight (`sharding.opt_state_shardings`) and Newton-Schulz
    runs inside the same jit on those sharded arrays: XLA's partitioner
    inserts the collectives its matmuls and Frobenius norm need (all-gathers,
    all-reduces) rather than us gathering the matrix by hand, and the result
    is the unsharded update up to float summation order.
    """
    schedule = _schedule(t, t.lr)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=decay_mask)
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    if t.get("optimizer", "adamw") == "muon":
        # The last two axes are the matrix (a layer-stacked kernel's leading axis is a batch axis).
        dims = lambda params: jax.tree.map(
            lambda p: optax.contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1), params)
        muon = optax.contrib.muon(_schedule(t, t.muon_lr), beta=t.muon_beta, weight_decay=t.weight_decay,
                                  ns_steps=t.muon_ns_steps, muon_weight_dimension_numbers=dims)
        labels = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "muon" if is_hidden_matrix(path) else "adamw", params)
        parts.append(optax.partition({"muon": muon, "adamw": adamw}, labels))
    else:
        parts.append(adamw)
    return optax.chain(*parts), schedule


def abstract_model(model_cfg):
    """The model with ShapeDtypeStructs for weights: its graphdef and shapes, nothing allocated."""
    return nnx.eval_shape(lambda: model_lib.GPT(model_cfg, rngs=nnx.Rngs(0)))


def init_params(model_cfg, seed: int, shardings=None):
    def init():
        return nnx.to_pure_dict(nnx.state(model_lib.GPT(model_cfg, rngs=nnx.Rngs(seed))))

    return jax.jit(init, out_shardings=shardings)()


@dataclasses.dataclass
class TrainSetup:
    """What a compiled step needs: the model's graphdef, the optimizer, the state and its shardings."""

    mesh: jax.sharding.Mesh
    graphdef: object
    tx: optax.GradientTransformation
    schedule: object  # step -> learning rate
    state: dict  # {"params", "opt_state", "step"}
    state_sh: dict  # shardings of the same tree
    batch_sh: jax.sharding.NamedSharding
    scalar_sh: jax.sharding.NamedSharding

    @property
    def params_sh(self):
        return self.state_sh["params"]


def init_train_state(cfg, mesh, params=None, abstract: bool = False) -> TrainSetup:
    """Fresh parameters (from train.seed, or `params` given, in either layer layout) and optimizer state,
    laid out on `mesh`.

    `abstract=True` allocates nothing: the state holds ShapeDtypeStructs with
    their shardings, enough to lower and compile the steps (gptjax.plan).
    """
    t = cfg.train
    model = abstract_model(cfg.model)
    abstract_params = nnx.to_pure_dict(nnx.state(model))
    params_sh = sharding.param_shardings(params_lib.logical_axes(model), mesh, abstract_params)
    tx, schedule = make_optimizer(t)
    opt_sh = sharding.opt_state_shardings(tx, abstract_params, params_sh, mesh)
    scalar_sh = sharding.replicated(mesh)
    state_sh = {"params": params_sh, "opt_state": opt_sh, "step": scalar_sh}
    if abstract:
        shapes = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
                  "step": jax.ShapeDtypeStruct((), jnp.int32)}
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
    else:
        if params is None:
            params = init_params(cfg.model, t.seed, params_sh)
        else:  # pretrained weights come per layer (GPT-2, checkpoints): stacked for a scanned model
            layout = params_lib.stack_layers if cfg.model.get("scan_layers", False) else params_lib.unstack_layers
            params = jax.device_put(layout(params), params_sh)
        state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), scalar_sh)}
    return TrainSetup(mesh, nnx.graphdef(model), tx, schedule, state, state_sh,
                      sharding.batch_sharding(mesh), scalar_sh)


def make_train_step(setup: TrainSetup, cfg, steps_per_call: int = 1):
    """One compiled call: `steps_per_call` optimizer steps, each over `train.grad_accum` micro-batches.

    With steps_per_call = 1 the call takes x, y of shape [B, T] and returns
    scalar metrics; with k > 1 it takes [k, B, T] (k consecutive batches) and
    returns metrics of shape [k], one entry per step, so logging sees every
    step. Micro-batch i holds rows i, i+A, i+2A, ... of the batch: each device
    keeps its own rows, and equal-size micro-batches make the mean of their
    mean losses equal the full batch's mean loss.
    """
    graphdef, tx, grad_accum, dropout = setup.graphdef, setup.tx, cfg.train.grad_accum, cfg.model.dropout
    base_key = jax.random.key(cfg.train.seed)
    gathered, gather_layer = sharding.compute_layout(setup.params_sh)  # FSDP: weights gathered for compute

    def grads_of(params, x, y, key):
        compute = lambda p: loss_fn(graphdef, jax.lax.with_sharding_constraint(p, gathered), x, y, key, gather_layer)
        return jax.value_and_grad(compute)(params)

    def accumulated(params, x, y, key):
        B, T = x.shape
        micro = lambda a: a.reshape(B // grad_accum, grad_accum, T).swapaxes(0, 1)

        def body(carry, i_xy):
            i, mx, my = i_xy
            loss, grads = grads_of(params, mx, my, None if key is None else jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro(x), micro(y)))
        return jax.tree.map(lambda g: g / grad_accum, (loss, grads))

    def one_step(state, x, y):
        key = jax.random.fold_in(base_key, state["step"]) if dropout > 0 else None
        if grad_accum > 1:
            loss, grads = accumulated(state["params"], x, y, key)
        else:
            loss, grads = grads_of(state["params"], x, y, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        grad_norm = optax.tree.norm(grads)
        new_state, finite = faults.skip_nonfinite(state, new_state, loss, grad_norm)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    def train_step(state, x, y):
        if steps_per_call == 1:
            return one_step(state, x, y)
        return jax.lax.scan(lambda s, xy: one_step(s, *xy), state, (x, y))

    batch_sh = sharding.stacked_batch_sharding(setup.mesh) if steps_per_call > 1 else setup.batch_sh
    return jax.jit(
        train_step,
        in_shardings=(setup.state_sh, batch_sh, batch_sh),
        out_shardings=(setup.state_sh, setup.scalar_sh),
        donate_argnums=0,
    )


def make_eval_step(setup: TrainSetup):
    """jit(params, x, y) -> mean token loss of the batch."""
    gathered, gather_layer = sharding.compute_layout(setup.params_sh)
    return jax.jit(
        lambda params, x, y: loss_fn(setup.graphdef, jax.lax.with_sharding_constraint(params, gathered), x, y,
                                     gather_layer=gather_layer),
        in_shardings=(setup.params_sh, setup.batch_sh, setup.batch_sh),
        out_shardings=setup.scalar_sh,
    )


def make_eval_sum_step(graphdef, params_sh=None, batch_sh=None, scalar_sh=None):
    """jit(params, x, y, w) -> summed token loss over the rows whose weight is 1.

    The full-split evaluation pads its last batch with weight-0 rows, so one
    compiled shape scores every batch. Without shardings it runs on the
    default device (sampling/eval of a loaded workdir).
    """
    gathered, gather_layer = sharding.compute_layout(params_sh) if params_sh is not None else (None, None)

    def eval_sum(params, x, y, w):
        if gathered is not None:
            params = jax.lax.with_sharding_constraint(params, gathered)
        losses = token_losses(nnx.merge(graphdef, params)(x, gather_layer=gather_layer), y)
        return (losses.sum(axis=-1) * w).sum()

    if params_sh is None:
        return jax.jit(eval_sum)
    return jax.jit(eval_sum, in_shardings=(params_sh, batch_sh, batch_sh, batch_sh), out_shardings=scalar_sh)
