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

import contextlib
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np

from ablab._keras import early_stopping_minimizes, flatten_layers
from ablab.engine import lowering, trace_cache
from ablab.engine import probes as _probes
from ablab.engine.data import Split, row_shape
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
from ablab.engine.xla import compiler_options, wants_library_fusions
from ablab.study.schema import EarlyStoppingSpec, ReduceLROnPlateauSpec


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
    steps_limit: int | None = None
    """``fit(steps_per_epoch=...)`` when it cuts a pass over the rows into several epochs
    (fewer steps than batches per pass), else None."""
    weighted: bool = False
    """Do the batches carry sample weights?"""

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_limit or self.batches_per_pass

    def epoch_window(self, epoch: Any) -> tuple[Any, Any]:
        """``(pass, first batch)`` of ``epoch`` (ints or traced): with ``steps_limit`` an epoch
        takes the next ``steps_limit`` batches of the current pass over the rows, as fit's
        epoch iterator does with arrays; else each epoch is a pass of its own."""
        if self.steps_limit is None:
            return epoch, 0
        start = epoch * self.steps_limit
        return start // self.batches_per_pass, start % self.batches_per_pass


def _run_batches(
    step: Callable,
    trace: Callable | None,
    state: Any,
    x: Any,
    y: Any,
    full: int,
    part: int,
    bs: int,
    sw: jax.Array | None = None,
) -> tuple[Any, Any, Any]:
    """``full`` batches of ``bs`` rows (``lax.scan``) then a last partial one of ``part`` rows,
    as ``fit`` feeds them: ``(state, the last batch's logs, per-step traces or None)``.
    sw: (rows,) sample weights, the batch's third element as in ``fit``; None: unweighted.
    x, y: arrays, or dicts / lists of arrays (a multi-input / multi-output model's)."""
    logs, traces = None, []
    arrays = (x, y) if sw is None else (x, y, sw)
    if full:
        batched = jax.tree.map(lambda a: a[: full * bs].reshape(full, bs, *a.shape[1:]), arrays)

        def body(st: Any, batch: tuple) -> tuple[Any, tuple]:
            out_logs, st, extra = step(st, batch)
            return st, (out_logs, trace(out_logs, st, extra) if trace else None)

        state, (stacked, steps) = jax.lax.scan(body, state, batched)
        logs = jax.tree.map(lambda a: a[-1], stacked)
        traces.append(steps)
    if part:
        logs, state, extra = step(state, jax.tree.map(lambda a: a[full * bs :], arrays))
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


STOPPED_EPOCH = "stopped_epoch"
"""History key of a program with early stopping: (seeds,) int32, the 1-based epoch each seed
stopped at (0: it ran every epoch); ``ablab.store.records`` stores it as a column."""


def steps_limit(steps_per_epoch: int | None, n_train: int, batch_size: int) -> int | None:
    """The steps an epoch takes when ``fit(steps_per_epoch=...)`` cuts each pass over the
    rows into several epochs; None when every epoch is a whole pass (not given, or at least
    the batches of one pass: fit then ends each epoch when the pass runs out)."""
    batches = math.ceil(n_train / batch_size)
    if steps_per_epoch is None or steps_per_epoch >= batches:
        return None
    return steps_per_epoch


def is_improvement(
    value: jax.Array, reference: jax.Array | float, minimize: bool, min_delta: float
) -> jax.Array:
    """``keras.callbacks.MonitorCallback._is_improvement`` (shared by EarlyStopping and
    ReduceLROnPlateau), traced in float32: ``value`` beats ``reference`` by more than
    ``min_delta`` in the monitor's direction."""
    ref = jnp.asarray(reference, jnp.float32)
    delta = jnp.float32(min_delta)
    if minimize:
        return jnp.less(value + delta, ref)
    return jnp.greater(value - delta, ref)


class StopState(NamedTuple):
    """One seed's ``keras.callbacks.EarlyStopping`` state, carried through the epoch scan."""

    best: jax.Array
    has_best: jax.Array
    wait: jax.Array
    stopped: jax.Array
    epoch: jax.Array
    """0-based epoch it stopped at (valid where ``stopped``)."""

    @staticmethod
    def initial() -> StopState:
        f, i = jnp.float32, jnp.int32
        return StopState(f(0), jnp.bool_(False), i(0), jnp.bool_(False), i(0))


@dataclass(frozen=True)
class StoppingRule:
    """``keras.callbacks.EarlyStopping.on_epoch_end`` (Keras 3.15), per seed and traced."""

    monitor: str
    minimize: bool
    min_delta: float
    patience: int
    baseline: float | None
    start_from_epoch: int

    @staticmethod
    def of(spec: EarlyStoppingSpec, model: keras.Model) -> StoppingRule:
        return StoppingRule(
            monitor=spec.monitor,
            minimize=early_stopping_minimizes(model, spec.monitor, spec.mode),
            min_delta=abs(spec.min_delta),
            patience=spec.patience,
            baseline=spec.baseline,
            start_from_epoch=spec.start_from_epoch,
        )

    def _improves(self, value: jax.Array, reference: jax.Array | float) -> jax.Array:
        return is_improvement(value, reference, self.minimize, self.min_delta)

    def update(self, st: StopState, value: jax.Array, epoch: jax.Array) -> StopState:
        """The state after epoch ``epoch`` logged ``value``; a stopped seed's stays."""
        value = jnp.asarray(value, jnp.float32)
        improved = ~st.has_best | self._improves(value, st.best)
        beats = True if self.baseline is None else self._improves(value, self.baseline)
        wait = jnp.where(improved & beats, 0, st.wait + 1)
        stop_now = ~improved & (st.wait + 1 >= self.patience) & (epoch > 0)
        new = StopState(
            best=jnp.where(improved, value, st.best),
            has_best=jnp.bool_(True),
            wait=wait.astype(jnp.int32),
            stopped=stop_now,
            epoch=epoch.astype(jnp.int32),
        )
        watching = ~st.stopped & (epoch >= self.start_from_epoch)
        return jax.tree.map(lambda n, o: jnp.where(watching, n, o), new, st)


LEARNING_RATE = "learning_rate"
"""History key ``keras.callbacks.ReduceLROnPlateau`` adds: the rate each epoch trained with."""


class PlateauState(NamedTuple):
    """One seed's ``keras.callbacks.ReduceLROnPlateau`` state, carried through the epoch scan."""

    best: jax.Array
    has_best: jax.Array
    wait: jax.Array
    cooldown: jax.Array
    reductions: jax.Array
    """How many times the rate was lowered: the rate is ``PlateauRule.rates[reductions]``."""

    @staticmethod
    def initial() -> PlateauState:
        f, i = jnp.float32, jnp.int32
        return PlateauState(f(0), jnp.bool_(False), i(0), i(0), i(0))


@dataclass(frozen=True)
class PlateauRule:
    """``keras.callbacks.ReduceLROnPlateau.on_epoch_end`` (Keras 3.15), per seed and traced.

    The rates a seed can have are the initial one lowered k times, each step done as Keras
    does it on the host (``float(lr) * factor`` in float64, ``max`` with ``min_lr``, stored
    into the float32 variable): they are computed here, so a seed carries only ``k``.
    """

    monitor: str
    minimize: bool
    min_delta: float
    patience: int
    cooldown: int
    index: int
    """Position of the learning-rate variable among the optimizer's variables."""
    rates: tuple[float, ...]
    reducible: tuple[bool, ...]
    """``rates[k] > float32(min_lr)``: whether Keras lowers the rate from ``rates[k]``."""

    @staticmethod
    def of(spec: ReduceLROnPlateauSpec, model: keras.Model, epochs: int) -> PlateauRule:
        optimizer = model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        lr_var = getattr(inner, "_learning_rate", None)
        index = next((i for i, v in enumerate(optimizer.variables) if v is lr_var), None)
        if index is None or lr_var is None:
            raise ValueError(
                "ReduceLROnPlateau needs an optimizer whose learning rate is a number "
                "(a variable), not a schedule"
            )
        rate = np.float32(np.asarray(lr_var.value))
        rates, reducible = [], []
        for _ in range(epochs + 1):
            rates.append(float(rate))
            can = float(rate) > np.float32(spec.min_lr)
            reducible.append(bool(can))
            if can:
                rate = np.float32(max(float(rate) * spec.factor, spec.min_lr))
        return PlateauRule(
            monitor=spec.monitor,
            minimize=early_stopping_minimizes(model, spec.monitor, spec.mode),
            min_delta=abs(spec.min_delta),
            patience=spec.patience,
            cooldown=spec.cooldown,
            index=index,
            rates=tuple(rates),
            reducible=tuple(reducible),
        )

    def rate(self, st: PlateauState) -> jax.Array:
        return jnp.asarray(self.rates, jnp.float32)[st.reductions]

    def update(self, st: PlateauState, value: jax.Array) -> PlateauState:
        """The state after an epoch logged ``value``."""
        value = jnp.asarray(value, jnp.float32)
        better = is_improvement(value, st.best, self.minimize, self.min_delta)
        cooling = st.cooldown > 0
        cooldown = jnp.where(cooling, st.cooldown - 1, st.cooldown)
        wait = jnp.where(cooling, 0, st.wait)
        improved = ~st.has_best | better
        counts = ~improved & (cooldown <= 0)
        wait = jnp.where(improved, 0, jnp.where(counts, wait + 1, wait))
        can = jnp.asarray(self.reducible)[st.reductions]
        reduced = counts & (wait >= self.patience) & can
        return PlateauState(
            best=jnp.where(improved, value, st.best),
            has_best=jnp.bool_(True),
            wait=jnp.where(reduced, 0, wait).astype(jnp.int32),
            cooldown=jnp.where(reduced, self.cooldown, cooldown).astype(jnp.int32),
            reductions=st.reductions + reduced.astype(jnp.int32),
        )


class Recorder:
    """What a seed's training records besides the History: nothing (this base class), the
    weight trajectory (:class:`Trajectory`) or the probes (:class:`Probes`). One compiled
    program per recorder; the History is the same whichever records."""

    traced = False
    """Does it record something after every optimizer step?"""
    keeps_initial = False
    """Does the program return every seed's initial trainable weights (``steps["initial"]``)?"""

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
    ``{"loss": (steps,), "weights": [(steps, *shape)]}``, and the initial weights
    (``"initial"``: the program that trains the seeds returns them, so that the checks need
    no program of their own to draw them -- one compile less per checked variant)."""

    traced = True
    keeps_initial = True

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
        x_tr, y_tr, x_va, y_va = ctx.data[:4]
        vbs = lay.val_batch_size
        tfull, trem = _batches(lay.n_train, vbs)
        state = (ctx.tv, ctx.ntv, ctx.metrics0)
        per_epoch = {}
        if self.spec.train_loss:
            test_step = _test_step(model)
            _, tr_logs, _ = _run_batches(test_step, None, state, x_tr, y_tr, tfull, trem, vbs)
            per_epoch["train_loss_inference"] = tr_logs["loss"]
        if lay.n_val and self.spec.bn:

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
        self._probe_spec = (
            make_probe_spec(prepared, split.x_train, split.y_train) if probes else None
        )
        self.split = split
        train = prepared.train
        self.layout = EpochLayout(
            n_train=split.n_train,
            n_val=split.n_val,
            batch_size=train.batch_size,
            val_batch_size=train.validation_batch_size or train.batch_size,
            epochs=train.epochs,
            shuffle=train.shuffle,
            steps_limit=steps_limit(train.steps_per_epoch, split.n_train, train.batch_size),
            weighted=split.sw_train is not None,
        )
        model = prepared.model
        self.stopping = (
            None if train.early_stopping is None else StoppingRule.of(train.early_stopping, model)
        )
        self.plateau = (
            None
            if train.reduce_lr_on_plateau is None
            else PlateauRule.of(train.reduce_lr_on_plateau, model, train.epochs)
        )
        self._optimizer0 = [np.asarray(v.value) for v in model.optimizer.variables]
        self._metrics0 = [np.asarray(v.value) for v in model.metrics_variables]
        self._data = (
            jax.tree.map(jnp.asarray, split.x_train),
            jax.tree.map(jnp.asarray, split.y_train),
            None if split.x_val is None else jax.tree.map(jnp.asarray, split.x_val),
            None if split.y_val is None else jax.tree.map(jnp.asarray, split.y_val),
            None if split.sw_train is None else jnp.asarray(split.sw_train, jnp.float32),
            None if split.sw_val is None else jnp.asarray(split.sw_val, jnp.float32),
        )
        self._compiled: dict[tuple[str, int], Any] = {}  # (program, seeds) -> executable
        self._fingerprints: dict[tuple[str, int], str] = {}  # (program, seeds) -> its StableHLO's
        self._compiling = threading.Lock()  # cells of one program may run in several threads
        self._exportable = True  # traced through jax.export (trace_cache) until that fails
        self.model_description: str | None = None
        """The study's description of the model (its layer list, JSON): set by
        ``build_program`` for a model built from one; the key of its kept traces."""
        self._seconds: dict[tuple[str, int], float] = {}  # (program, seeds) -> to compile
        self.library_fusions = wants_library_fusions(model)
        """Compiled with XLA's default YNNPACK fusions (``ablab.engine.xla``: BN, feature maps;
        on a CPU backend only -- an accelerator compiles with XLA's defaults)."""

    # -- the traced program --------------------------------------------------------------
    def _train_seed(
        self, seed_id: jax.Array, tv: list, ntv: list, data: tuple, recorder: Recorder
    ) -> tuple[dict, dict | None, dict | None]:
        """One seed: ``(history {name: (epochs,)}, per-step trace, per-epoch probes)``; what
        is traced besides the History is the ``recorder``'s (:class:`Recorder`)."""
        model = self.prepared.model
        lay = self.layout
        x_tr, y_tr, x_va, y_va, sw_tr, sw_va = data
        nfull, rem = _batches(lay.n_train, lay.batch_size)
        if lay.steps_limit is not None:  # a window of whole batches of the current pass
            nfull, rem = lay.steps_limit, 0
        stopping, plateau = self.stopping, self.plateau
        vfull, vrem = _batches(lay.n_val, lay.val_batch_size)
        metrics0 = self._metrics0
        tv0, ntv0 = tv, ntv

        def train_step(st: tuple, batch: tuple) -> tuple[dict, tuple, Any]:
            return recorder.train_step(model, st, batch)

        def trace(logs: dict, state: tuple, extra: Any) -> dict:
            return recorder.step(logs, state, extra, tv0)

        def epoch(carry: tuple, epoch_index: jax.Array) -> tuple[tuple, tuple]:
            tv, ntv, ov, stop, lr_state = carry
            pass_index, first = lay.epoch_window(epoch_index)
            rows = None  # the epoch's training rows, in order (None: all, in file order)
            if lay.shuffle:
                rows = epoch_permutation(seed_id, pass_index, lay.n_train)
            if lay.steps_limit is not None:
                rows = jnp.arange(lay.n_train) if rows is None else rows
                size = lay.steps_limit * lay.batch_size
                rows = jax.lax.dynamic_slice_in_dim(rows, first * lay.batch_size, size)
            pick = (lambda a: a) if rows is None else (lambda a: jax.tree.map(lambda b: b[rows], a))
            x_ep, y_ep = pick(x_tr), pick(y_tr)
            sw_ep = None if sw_tr is None else pick(sw_tr)
            state = (tv, ntv, ov, metrics0)
            step_trace = trace if recorder.traced else None
            state, logs, steps = _run_batches(
                train_step, step_trace, state, x_ep, y_ep, nfull, rem, lay.batch_size, sw_ep
            )
            new = state[:3]
            out = dict(logs)
            if lay.n_val:
                _, val_logs, _ = _run_batches(
                    _test_step(model), None, (*new[:2], metrics0), x_va, y_va, vfull, vrem,
                    lay.val_batch_size, sw_va,
                )  # fmt: skip
                out.update({f"val_{k}": v for k, v in val_logs.items()})
            if stopping is not None:  # a stopped seed keeps its state (its History is filled)
                keep = functools.partial(jnp.where, stop.stopped)
                new = jax.tree.map(keep, (tv, ntv, ov), new)
                stop = stopping.update(stop, out[stopping.monitor], epoch_index)
            tv, ntv, ov = new
            if plateau is not None:  # logged before it may lower the rate, as in fit
                out[LEARNING_RATE] = plateau.rate(lr_state)
                lr_state = plateau.update(lr_state, out[plateau.monitor])
                ov = list(ov)
                ov[plateau.index] = plateau.rate(lr_state).astype(ov[plateau.index].dtype)
            ctx = EpochEnd(model, lay, tv, ntv, ov, ntv0, metrics0, data)
            return (tv, ntv, ov, stop, lr_state), (out, steps, recorder.epoch_end(ctx))

        stop0 = StopState.initial() if stopping is not None else None
        lr0 = PlateauState.initial() if plateau is not None else None
        ov0 = list(self._optimizer0)
        carry0 = (tv, ntv, ov0, stop0, lr0)
        (*_, stop, _), (history, steps, per_epoch) = jax.lax.scan(
            epoch, carry0, jnp.arange(lay.epochs)
        )
        history = {k: jnp.asarray(v, jnp.float32) for k, v in history.items()}
        if recorder.traced:  # (epochs, steps per epoch, ...) -> (steps, ...)
            steps = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), steps)
        if stop is not None:  # after its stop a seed's History repeats its last epoch
            last = jnp.where(stop.stopped, stop.epoch, lay.epochs - 1)
            held = jnp.minimum(jnp.arange(lay.epochs), last)
            history, per_epoch = jax.tree.map(lambda a: a[held], (history, per_epoch))
            if recorder.traced:
                n_steps = lay.epochs * lay.steps_per_epoch
                held_steps = jnp.minimum(jnp.arange(n_steps), (last + 1) * lay.steps_per_epoch - 1)
                steps = jax.tree.map(lambda a: a[held_steps], steps)
            history[STOPPED_EPOCH] = jnp.where(stop.stopped, stop.epoch + 1, 0)
        return history, steps, per_epoch

    def _all_seeds(self, seed_ids: jax.Array, data: tuple, recorder: Recorder) -> tuple:
        """Initial state for every seed, then ``_train_seed`` vmapped over seeds."""
        tv, ntv = initial_state(self.prepared, seed_ids)
        fn = functools.partial(self._train_seed, recorder=recorder)
        history, steps, per_epoch = jax.vmap(fn, in_axes=(0, 0, 0, None))(seed_ids, tv, ntv, data)
        if recorder.keeps_initial:
            assert steps is not None  # (recorded only by a traced recorder)
            steps = {**steps, "initial": list(tv)}
        return history, steps, per_epoch

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
                t0 = time.perf_counter()
                self._compiled[key] = self._compile_program(program, n)
                self._seconds[key] = time.perf_counter() - t0
            return self._compiled[key]

    def has_executable(self, program: str, n: int) -> bool:
        """Whether ``program`` for ``n`` seeds is compiled already."""
        with self._compiling:
            return (program, n) in self._compiled

    def adopt(self, program: str, n: int, executable: Any, seconds: float) -> None:
        """Use ``executable`` -- ``lower(program, n)`` compiled, in ``seconds`` -- from now on
        (the first one handed over stays)."""
        with self._compiling:
            if (program, n) not in self._compiled:
                self._compiled[(program, n)] = executable
                self._seconds[(program, n)] = seconds

    def record_fingerprint(self, program: str, n: int, fingerprint: str) -> None:
        """Remember the fingerprint of ``program`` for ``n`` seeds as lowered
        (``ablab.engine.compiling.fingerprint``), for :meth:`same_program_as`."""
        with self._compiling:
            self._fingerprints[(program, n)] = fingerprint

    def same_program_as(self, other: VariantProgram) -> bool:
        """Is this variant proven to be ``other``'s program, every program of it? Beyond
        identical training StableHLO (fingerprints recorded when both were compiled, for the
        same seed count, with the same compiler options), two things must hold:

        * both models are made of Keras' and ablab's own objects only, as a study's layer
          list builds them (``trace_cache.own_objects_only``): a model of the user's could
          override ``train_step``, which a probed training program re-implements (and then
          does not show) but the checks' trajectory program runs;
        * the same variables, in order, of the same shapes and dtypes: a weight that never
          reaches the loss is dropped from the training program, yet the trajectory records it.

        Then the programs are the same code over the same traced Keras functions. The data
        are arguments, not part of the text: a twin still runs on its own rows."""
        if self is other:
            return True
        if self.compiler_options() != other.compiler_options():
            return False
        # cheapest first: checks compare every pair of programs (``checks.twins``), and
        # walking a model's layers for _keras_own is the dear part
        with self._compiling:
            mine = {k: v for k, v in self._fingerprints.items() if k[0] == "train"}
        with other._compiling:
            theirs = {k: v for k, v in other._fingerprints.items() if k[0] == "train"}
        if not any(theirs.get(k) == v for k, v in mine.items()):
            return False
        if self._variable_specs() != other._variable_specs():
            return False
        return self._keras_own() and other._keras_own()

    def _keras_own(self) -> bool:
        """Is the model built from a study's layer list of Keras' and ablab's own objects?"""
        if self.model_description is None:
            return False
        try:
            train_json = self.prepared.train.model_dump_json()
        except Exception:  # an object without a config: the user's
            return False
        configs = [self.model_description, train_json]
        return trace_cache.own_objects_only(self.prepared.model, configs)

    def _variable_specs(self) -> tuple[list[tuple[tuple[int, ...], str]], ...]:
        """(shape, dtype) of the model's trainable and non-trainable variables, in order."""
        model = self.prepared.model
        return tuple(
            [(tuple(int(d) for d in v.shape), str(v.dtype)) for v in variables]
            for variables in (model.trainable_variables, model.non_trainable_variables)
        )

    def adopt_from(self, other: VariantProgram, program: str, n: int) -> bool:
        """Run ``other``'s compiled ``program`` for ``n`` seeds as this variant's (compiling it
        there first if needed); only for a proven twin (:meth:`same_program_as`). False when
        this variant has that program compiled already (it keeps its own)."""
        if not self.same_program_as(other):
            raise ValueError("adopt_from needs a twin: the two programs are not proven the same")
        if self.has_executable(program, n):
            return False
        self.adopt(program, n, other._executable(program, n), 0.0)
        return True

    def compile_time(self, program: str, n: int) -> float:
        """Seconds ``program`` for ``n`` seeds took to lower and compile (0 if not compiled)."""
        with self._compiling:
            return self._seconds.get((program, n), 0.0)

    def compile_cost(self, program: str) -> int:
        """A rough estimate of how long ``program`` takes XLA to compile, to compile the
        costliest first (``ablab.engine.compiling.lowering_order``; only the order matters):
        the model's layers and variables -- each adds forward, backward and optimizer work --
        doubled for a training program with probes (the flagship: plain 6 and BN 13, plain's
        probed program compiled in 1.9 s, BN's in 2.8 s, each ~1.6x its probe-free twin)."""
        model = self.prepared.model
        size = len(model.layers) + len(model.variables)
        return 2 * size if self.probes and program == "train" else size

    def compiler_options(self) -> dict[str, Any]:
        """The XLA options this variant's programs compile with (``ablab.engine.xla``)."""
        return compiler_options(self.library_fusions)

    def lower(self, program: str, n: int) -> Any:
        """``program`` ("train", "trajectory" or "init") for ``n`` seeds, traced and lowered
        (``jax.stages.Lowered``): compiled here when first used, or ahead by
        ``ablab.engine.compiling`` and handed back with :meth:`adopt`.

        A model of Keras' own objects is traced through ``jax.export`` and its trace kept
        between runs (``ablab.engine.trace_cache``: a warm run loads it instead of tracing);
        the user's classes are traced every time."""
        ids = jax.ShapeDtypeStruct((n,), jnp.uint32)
        fn: Callable[..., Any]
        args: tuple[Any, ...]
        context: Callable[[], contextlib.AbstractContextManager[Any]]
        if program == "init":
            fn, args, context = (
                lambda i: initial_state(self.prepared, i),
                (ids,),
                contextlib.nullcontext,
            )
        else:
            recorder = self._recorder(program)
            fn = functools.partial(self._all_seeds, recorder=recorder)
            # traced with conv / pooling lowerings XLA runs well
            args = (ids, self._data)
            fusions = self.library_fusions and jax.default_backend() == "cpu"  # (YNNPACK: CPU)
            context = functools.partial(lowering.lowered, library_fusions=fusions)
        key = None
        if self._exportable:
            try:
                key = self._trace_key(program, n)
            except Exception:  # a model the key cannot describe: traced the plain way
                self._exportable = False
        if key is not None:
            try:
                exported = trace_cache.exported_program(key, fn, args, context)
                return jax.jit(exported.call).lower(*args)
            except Exception:  # not exportable after all (an effect, a custom call): trace
                self._exportable = False
        with context():
            return jax.jit(fn).lower(*args)

    def _trace_key(self, program: str, n: int) -> str | None:
        """What this program's trace depends on (``trace_cache.program_key``); None: keep no
        trace of it (a model not described by a study's layer list, or one holding the
        user's code)."""
        prepared = self.prepared
        if not self._keras_own():  # (an object without a config: nothing to key it by)
            return None
        train_json = prepared.train.model_dump_json()
        spec = self._probe_spec
        data = [
            None if a is None else (str(a.dtype), list(a.shape))
            for a in jax.tree.leaves(self._data, is_leaf=lambda a: a is None)
        ]
        return trace_cache.program_key(
            {
                "program": program,
                "seeds": n,
                "probes": None
                if spec is None or program != "train"
                else {
                    "bn_probe_rows": _probes.BN_PROBE_ROWS,  # (patched by a test)
                    "layers": spec.layers,
                    "train_loss": spec.train_loss,
                    "bn": [
                        {
                            k: getattr(b, k)
                            for k in ("layer_id", "momentum", "sub_tv", "sub_ntv", "axis")
                        }
                        | {"indices": [b.mean_index, b.var_index]}
                        for b in spec.bn
                    ],
                },
                "model": self.model_description,
                "library_fusions": self.library_fusions,  # (the `bias` lowering follows it)
                "train": train_json,
                "ids": [prepared.trainable_ids, prepared.non_trainable_ids, prepared.seed_state],
                "output_shape": list(prepared.output_shape),
                "layout": dataclasses.asdict(self.layout),
                "stopping": None if self.stopping is None else repr(self.stopping),
                "plateau": None if self.plateau is None else repr(self.plateau),
                "data": [str(jax.tree.structure(self._data)), data],
                "constants": trace_cache.array_digest(self._optimizer0 + self._metrics0),
            }
        )

    def _compile_program(self, program: str, n: int) -> Any:
        return self.lower(program, n).compile(compiler_options=self.compiler_options())

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
        self._executable("train", chunk_size)
        return self.compile_time("train", chunk_size)

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
        tv0 = [np.asarray(a) for a in steps["initial"]]
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
            acts = activation_elements(model, row_shape(self.split.x_train))
            probe_elements += 2 * min(lay.n_train, BN_PROBE_ROWS) * acts * len(self._probe_spec.bn)
        return footprint(
            model,
            optimizer_elements=sum(int(np.prod(v.shape)) for v in model.optimizer.variables),
            x_row=row_shape(self.split.x_train),
            y_row=row_shape(self.split.y_train),
            n_train=lay.n_train,
            batch_size=lay.batch_size,
            val_batch_size=lay.val_batch_size,
            shuffle=lay.shuffle,
            steps=steps,
            probe_elements=probe_elements,
            weighted=lay.weighted,
        )
