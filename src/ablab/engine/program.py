"""The vectorized engine: one compiled program trains a chunk of seeds of one variant.

Inside the program, per seed: ``lax.scan`` over epochs, and inside each epoch
``lax.scan`` over the full batches (plus one call for a last partial batch), each
step being the model's own ``JAXTrainer.train_step`` -- the very function
``model.fit`` runs on the JAX backend (stateless_call + compute_loss +
optimizer.stateless_apply + metric updates). Metrics are reset at each epoch
start, validation runs ``test_step`` over the validation rows in inference mode
at each epoch end, exactly as ``fit`` -> ``evaluate`` does. ``jax.vmap`` maps this
over seeds and ``jax.jit`` compiles it once per variant and chunk size.

Data order follows ``fit``: the validation rows are the last fraction (cut before
any shuffling); ``shuffle=True`` draws a fresh permutation of the training rows
every epoch from the seed's own key (shared by every variant: paired); the last
partial batch is kept; the epoch ``loss`` is the batch-size-weighted mean of the
pre-update batch losses (Keras' loss tracker).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from ablab._keras import flatten_layers
from ablab.engine.data import Split
from ablab.engine.initial_state import SHUFFLE_STREAM, initial_state, stream_key
from ablab.engine.memory import Footprint, activation_elements, footprint
from ablab.engine.model import PreparedModel
from ablab.engine.probes import (
    BN_PROBE_ROWS,
    ProbeSpec,
    bn_probes,
    make_probe_spec,
    step_probes,
    train_mode_test_step,
    train_step_with_grads,
)
from ablab.engine.xla import compiler_options


def epoch_permutation(seed_id: int | jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
    """The training-row order seed ``seed_id`` uses in ``epoch`` when ``shuffle=True``: (n,)."""
    key = jax.random.fold_in(stream_key(jnp.asarray(seed_id, jnp.uint32), SHUFFLE_STREAM), epoch)
    return jax.random.permutation(key, n)


def _batches(n: int, batch_size: int) -> tuple[int, int]:
    """(number of full batches, rows in the last partial batch)."""
    return n // batch_size, n % batch_size


@dataclass(frozen=True)
class EpochLayout:
    """Static shape facts of one training program."""

    n_train: int
    n_val: int
    batch_size: int
    val_batch_size: int
    epochs: int
    shuffle: bool

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)


def _run_batches(
    step: Callable,
    trace: Callable | None,
    state: Any,
    x: jax.Array,
    y: jax.Array,
    full: int,
    part: int,
    bs: int,
) -> tuple[Any, Any, Any]:
    """``full`` batches of ``bs`` rows (``lax.scan``) then a last partial one of ``part`` rows,
    as ``fit`` feeds them: ``(state, the last batch's logs, per-step traces or None)``."""
    logs, traces = None, []
    if full:
        xb = x[: full * bs].reshape(full, bs, *x.shape[1:])
        yb = y[: full * bs].reshape(full, bs, *y.shape[1:])

        def body(st: Any, batch: tuple) -> tuple[Any, tuple]:
            out_logs, st, extra = step(st, batch)
            return st, (out_logs, trace(out_logs, st, extra) if trace else None)

        state, (stacked, steps) = jax.lax.scan(body, state, (xb, yb))
        logs = jax.tree.map(lambda a: a[-1], stacked)
        traces.append(steps)
    if part:
        logs, state, extra = step(state, (x[full * bs :], y[full * bs :]))
        if trace:
            traces.append(jax.tree.map(lambda a: a[None], trace(logs, state, extra)))
    steps = None
    if trace:
        steps = jax.tree.map(lambda *a: jnp.concatenate(a), *traces)
    return state, logs, steps


def _test_step(model: keras.Model) -> Callable:
    """``model.test_step`` in the ``(logs, state, extra)`` form :func:`_run_batches` takes."""

    def step(st: tuple, batch: tuple) -> tuple[dict, tuple, Any]:
        logs, st = model.test_step(st, batch)
        return logs, st, None

    return step


@dataclass(frozen=True)
class EpochEnd:
    """What a recorder sees at the end of an epoch (inside the traced program, one seed)."""

    model: keras.Model
    layout: EpochLayout
    tv: Any
    ntv: Any
    ov: Any
    ntv0: Any
    metrics0: Any
    data: tuple


class Recorder:
    """What a seed's training records besides the History: nothing (this base class), the
    weight trajectory (:class:`Trajectory`) or the probes (:class:`Probes`). One compiled
    program per recorder; the History is the same whichever records."""

    traced = False
    """Does it record something after every optimizer step?"""

    def train_step(self, model: keras.Model, st: tuple, batch: tuple) -> tuple[dict, tuple, Any]:
        """One optimizer step as ``fit`` runs it: ``(logs, state, extra for step())``."""
        logs, st = model.train_step(st, batch)
        return logs, st, None

    def step(self, logs: dict, state: tuple, extra: Any, tv0: list) -> dict:
        """What is recorded after a step (``traced`` recorders only)."""
        raise NotImplementedError

    def epoch_end(self, ctx: EpochEnd) -> dict | None:
        """What is recorded at the end of an epoch, or None."""
        return None


class Trajectory(Recorder):
    """The checks' recorder: the running loss and every weight after each optimizer step,
    ``{"loss": (steps,), "weights": [(steps, *shape)]}``."""

    traced = True

    def step(self, logs: dict, state: tuple, extra: Any, tv0: list) -> dict:
        return {"loss": logs["loss"], "weights": list(state[0])}


class Probes(Recorder):
    """Per-step probe scalars (``ablab.engine.probes.step_probes``, from the gradients) and
    per-epoch probes: inference-mode train loss, train-mode val loss, BatchNormalization's
    statistics (``bn_probes``)."""

    traced = True

    def __init__(self, spec: ProbeSpec) -> None:
        self.spec = spec

    def train_step(self, model: keras.Model, st: tuple, batch: tuple) -> tuple[dict, tuple, Any]:
        return train_step_with_grads(model, st, batch)

    def step(self, logs: dict, state: tuple, extra: Any, tv0: list) -> dict:
        return step_probes(self.spec, list(state[0]), list(tv0), list(extra))

    def epoch_end(self, ctx: EpochEnd) -> dict:
        lay, model = ctx.layout, ctx.model
        x_tr, y_tr, x_va, y_va = ctx.data
        vbs = lay.val_batch_size
        tfull, trem = _batches(lay.n_train, vbs)
        state = (ctx.tv, ctx.ntv, ctx.metrics0)
        _, tr_logs, _ = _run_batches(_test_step(model), None, state, x_tr, y_tr, tfull, trem, vbs)
        per_epoch = {"train_loss_inference": tr_logs["loss"]}
        if lay.n_val:

            def train_mode_step(st: tuple, batch: tuple) -> tuple[dict, tuple, Any]:
                logs, st = train_mode_test_step(model, st, batch, ctx.ov)
                return logs, st, None

            vfull, vrem = _batches(lay.n_val, vbs)
            _, tm_logs, _ = _run_batches(train_mode_step, None, state, x_va, y_va, vfull, vrem, vbs)
            per_epoch["val_loss_train_mode"] = tm_logs["loss"]
        bn = bn_probes(self.spec, list(ctx.tv), list(ctx.ntv), list(ctx.ntv0), x_tr)
        per_epoch.update(bn)
        return per_epoch


class VariantProgram:
    """Trains any number of seeds of one prepared variant on one split.

    ``train(seed_ids)`` returns ``{log name: (seeds, epochs) float32}`` with the
    same names ``model.fit`` puts in its History (``loss``, metrics,
    ``val_loss``, ``val_<metric>``).
    """

    def __init__(self, prepared: PreparedModel, split: Split, probes: bool = False) -> None:
        self.prepared = prepared
        self.probes = probes
        self._probe_spec = make_probe_spec(prepared) if probes else None
        self.split = split
        train = prepared.train
        self.layout = EpochLayout(
            n_train=split.n_train,
            n_val=split.n_val,
            batch_size=train.batch_size,
            val_batch_size=train.validation_batch_size or train.batch_size,
            epochs=train.epochs,
            shuffle=train.shuffle,
        )
        model = prepared.model
        self._optimizer0 = [np.asarray(v.value) for v in model.optimizer.variables]
        self._metrics0 = [np.asarray(v.value) for v in model.metrics_variables]
        self._data = (
            jnp.asarray(split.x_train),
            jnp.asarray(split.y_train),
            None if split.x_val is None else jnp.asarray(split.x_val),
            None if split.y_val is None else jnp.asarray(split.y_val),
        )
        self._compiled: dict[tuple[str, int], Any] = {}  # (program, seeds) -> executable
        self._compiling = threading.Lock()  # cells of one program may run in several threads
        self.compile_seconds: dict[int, float] = {}

    # -- the traced program --------------------------------------------------------------
    def _train_seed(
        self, seed_id: jax.Array, tv: list, ntv: list, data: tuple, recorder: Recorder
    ) -> tuple[dict, dict | None, dict | None]:
        """One seed: ``(history {name: (epochs,)}, per-step trace, per-epoch probes)``; what
        is traced besides the History is the ``recorder``'s (:class:`Recorder`)."""
        model = self.prepared.model
        lay = self.layout
        x_tr, y_tr, x_va, y_va = data
        nfull, rem = _batches(lay.n_train, lay.batch_size)
        vfull, vrem = _batches(lay.n_val, lay.val_batch_size)
        metrics0 = self._metrics0
        tv0, ntv0 = tv, ntv

        def train_step(st: tuple, batch: tuple) -> tuple[dict, tuple, Any]:
            return recorder.train_step(model, st, batch)

        def trace(logs: dict, state: tuple, extra: Any) -> dict:
            return recorder.step(logs, state, extra, tv0)

        def epoch(carry: tuple, epoch_index: jax.Array) -> tuple[tuple, tuple]:
            tv, ntv, ov = carry
            if lay.shuffle:
                perm = epoch_permutation(seed_id, epoch_index, lay.n_train)
                x_ep, y_ep = x_tr[perm], y_tr[perm]
            else:
                x_ep, y_ep = x_tr, y_tr
            state = (tv, ntv, ov, metrics0)
            step_trace = trace if recorder.traced else None
            state, logs, steps = _run_batches(
                train_step, step_trace, state, x_ep, y_ep, nfull, rem, lay.batch_size
            )
            tv, ntv, ov, _ = state
            out = dict(logs)
            if lay.n_val:
                _, val_logs, _ = _run_batches(
                    _test_step(model), None, (tv, ntv, metrics0), x_va, y_va, vfull, vrem,
                    lay.val_batch_size,
                )  # fmt: skip
                out.update({f"val_{k}": v for k, v in val_logs.items()})
            ctx = EpochEnd(model, lay, tv, ntv, ov, ntv0, metrics0, data)
            return (tv, ntv, ov), (out, steps, recorder.epoch_end(ctx))

        carry0 = (tv, ntv, self._optimizer0)
        _, (history, steps, per_epoch) = jax.lax.scan(epoch, carry0, jnp.arange(lay.epochs))
        history = {k: jnp.asarray(v, jnp.float32) for k, v in history.items()}
        if recorder.traced:  # (epochs, steps per epoch, ...) -> (steps, ...)
            steps = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), steps)
        return history, steps, per_epoch

    def _all_seeds(self, seed_ids: jax.Array, data: tuple, recorder: Recorder) -> tuple:
        """Initial state for every seed, then ``_train_seed`` vmapped over seeds."""
        tv, ntv = initial_state(self.prepared, seed_ids)
        fn = functools.partial(self._train_seed, recorder=recorder)
        return jax.vmap(fn, in_axes=(0, 0, 0, None))(seed_ids, tv, ntv, data)

    def _recorder(self, program: str) -> Recorder:
        """The recorder of a compiled program: "trajectory" (the checks' weight
        trajectories), else probes when the program probes, else the History alone."""
        if program == "trajectory":
            return Trajectory()
        if self.probes:
            assert self._probe_spec is not None
            return Probes(self._probe_spec)
        return Recorder()

    def _executable(self, program: str, n: int) -> Any:
        """The compiled ``program`` ("train", "trajectory" or "init") for ``n`` seeds (cached)."""
        key = (program, n)
        with self._compiling:
            if key not in self._compiled:
                self._compiled[key] = self._compile_program(program, n)
            return self._compiled[key]

    def _compile_program(self, program: str, n: int) -> Any:
        ids = jax.ShapeDtypeStruct((n,), jnp.uint32)
        if program == "init":
            lowered = jax.jit(lambda i: initial_state(self.prepared, i)).lower(ids)
        else:
            fn = functools.partial(self._all_seeds, recorder=self._recorder(program))
            lowered = jax.jit(fn).lower(ids, self._data)
        return lowered.compile(compiler_options=compiler_options())

    # -- public -----------------------------------------------------------------------
    def culprit(self, exc: BaseException) -> str | None:
        """The layer behind a failure to compile, as ``"name (Class)"``: the innermost layer
        running when ``exc`` was raised, else the first layer that fails on its own under
        ``vmap`` (forward and gradient, abstractly); None if no layer is to blame."""
        return self._layer_in_traceback(exc) or self._first_unbatchable_layer()

    def _first_unbatchable_layer(self) -> str | None:
        model = self.prepared.model
        for layer in flatten_layers(model, include_self=False):
            if isinstance(layer, keras.Model | keras.layers.InputLayer) or not layer.built:
                continue
            try:
                inputs = layer.input
            except (AttributeError, ValueError):
                continue

            def spec(t: Any) -> jax.ShapeDtypeStruct:
                return jax.ShapeDtypeStruct((2, *(d or 3 for d in t.shape)), t.dtype)

            specs = jax.tree.map(spec, inputs)
            tv = [jnp.zeros(v.shape, v.dtype) for v in layer.trainable_variables]
            ntv = [jnp.zeros(v.shape, v.dtype) for v in layer.non_trainable_variables]

            def loss(tv: list, x: Any, layer: keras.Layer = layer, ntv: list = ntv) -> Any:
                out, _ = layer.stateless_call(tv, ntv, x, training=True)
                return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))

            try:
                jax.eval_shape(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)), tv, specs)
            except Exception:
                return f"{layer.name} ({type(layer).__name__})"
        return None

    def _layer_in_traceback(self, exc: BaseException) -> str | None:
        found = None
        seen: set[int] = set()
        err: BaseException | None = exc
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            tb = err.__traceback__
            while tb is not None:
                owner = tb.tb_frame.f_locals.get("self")
                if isinstance(owner, keras.Layer) and not isinstance(owner, keras.Model):
                    found = owner
                tb = tb.tb_next
            if found is not None:
                break
            err = err.__cause__ or err.__context__
        return None if found is None else f"{found.name} ({type(found).__name__})"

    def compile(self, chunk_size: int) -> float:
        """Compile the program for ``chunk_size`` seeds ahead of time; returns seconds spent."""
        if chunk_size not in self.compile_seconds:
            t0 = time.perf_counter()
            self._executable("train", chunk_size)
            self.compile_seconds.setdefault(chunk_size, time.perf_counter() - t0)
        return self.compile_seconds[chunk_size]

    def run(self, seed_ids: np.ndarray) -> tuple[dict, dict | None, dict | None]:
        """Train ``seed_ids`` (seeds,) in one call: ``(history, step probes, epoch probes)``,
        each ``{name: (seeds, epochs or steps)}``; the probes are None when off."""
        ids = np.asarray(seed_ids, dtype=np.uint32)
        self.compile(len(ids))
        history, steps, per_epoch = self._executable("train", len(ids))(
            jnp.asarray(ids), self._data
        )
        as_np = lambda d: None if d is None else {k: np.asarray(v) for k, v in d.items()}  # noqa: E731
        return as_np(history), as_np(steps), as_np(per_epoch)  # type: ignore[return-value]

    def train(self, seed_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Train seeds ``seed_ids`` (seeds,) in one program call: ``{name: (seeds, epochs)}``."""
        return self.run(seed_ids)[0]

    def trajectories(self, seed_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Per-step trajectories of a few seeds (for checks): ``{"loss": (seeds, steps),
        <trainable stable id>: (seeds, steps + 1, *shape)}`` -- weights start at the initial
        values (step 0) and follow each optimizer step; loss is the epoch's running loss as
        ``fit`` reports it after each batch. Memory grows with steps x parameters: keep the
        seed count small."""
        ids = jnp.asarray(seed_ids, dtype=jnp.uint32)
        _, steps, _ = self._executable("trajectory", len(ids))(ids, self._data)
        tv0, _ = self.initial_weights(np.asarray(seed_ids))
        out = {"loss": np.asarray(steps["loss"])}
        for vid, init, traj in zip(self.prepared.trainable_ids, tv0, steps["weights"], strict=True):
            out[vid] = np.concatenate([init[:, None], np.asarray(traj)], axis=1)
        return out

    def initial_weights(self, seed_ids: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The initial (trainable, non-trainable) values of every seed: each (seeds, *shape)."""
        ids = jnp.asarray(seed_ids, dtype=jnp.uint32)
        tv, ntv = self._executable("init", len(ids))(ids)
        return [np.asarray(a) for a in tv], [np.asarray(a) for a in ntv]

    def per_seed_bytes(self) -> int:
        """A conservative estimate of the memory one seed needs inside the program."""
        return self.footprint().bytes

    def footprint(self) -> Footprint:
        """One seed's memory inside the program, by kind (``ablab.engine.memory``)."""
        model = self.prepared.model
        lay = self.layout
        steps = lay.epochs * lay.steps_per_epoch
        probe_elements = 0
        if self.probes:  # per-step probe scalars and the BN probe's chunk of activations
            assert self._probe_spec is not None
            probe_elements = (3 * len(self._probe_spec.layers) + 1) * steps
            acts = activation_elements(model, self.split.x_train.shape[1:])
            probe_elements += 2 * min(lay.n_train, BN_PROBE_ROWS) * acts * len(self._probe_spec.bn)
        return footprint(
            model,
            optimizer_elements=sum(int(np.prod(v.shape)) for v in model.optimizer.variables),
            x_row=self.split.x_train.shape[1:],
            y_row=self.split.y_train.shape[1:],
            n_train=lay.n_train,
            batch_size=lay.batch_size,
            val_batch_size=lay.val_batch_size,
            shuffle=lay.shuffle,
            steps=steps,
            probe_elements=probe_elements,
        )
