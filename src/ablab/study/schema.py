"""The study: a validated description of what to train, how, in which variants, over which seeds.

A study comes from a TOML file (:func:`load_study`) or is built in code
(``Study(...)``); in code a builder may be a Python callable. Names, meanings
and defaults of ``[train]`` follow ``keras.Model.compile`` / ``keras.Model.fit``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ablab.errors import StudyError
from ablab.study.keras_names import keras_object_config, metric_name, snake_case

SECTIONS = (
    "data",
    "model",
    "train",
    "variants",
    "seeds",
    "engine",
    "verdicts",
    "checks",
    "probes",
    "sweep",
)

# Keras defaults (keras.Model.compile / keras.Model.fit, Keras 3.15).
FIT_DEFAULT_BATCH_SIZE = 32

# Sane ranges, checked when the study is read (before anything is allocated): beyond them a
# value is a typo (epochs = 1e12), not a study. Seeds are uint32 ids, base + count < 2**32.
MAX_EPOCHS = 1_000_000
MAX_SEEDS = 10_000_000
MAX_BATCH_SIZE = 2**24
MAX_SYNTHETIC_ELEMENTS = 2**31
"""Largest synthetic array (8 GiB as float32); beyond, the data alone would not fit."""
MIN_MEMORY_BUDGET_MB = 16.0
MAX_MEMORY_BUDGET_MB = float(2**24)
"""16 TiB: more than any one machine holds."""


class _KeyedError(ValueError):
    """A cross-field problem that knows its key, its offending value and its fix.

    relative: ``key`` is relative to the table that raised it (``optimizer.learning_rate``
    of whichever ``train`` table: ``[train]`` or a variant's override).
    """

    def __init__(
        self, key: str, expected: str, got: str, fix: str, *, relative: bool = False
    ) -> None:
        self.key, self.expected, self.got, self.fix = key, expected, got, fix
        self.relative = relative
        super().__init__(f"[{key}] expected {expected}; got {got}")


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or an infinity in a numeric field is refused, not trained on
    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, frozen=False, allow_inf_nan=False
    )


class SyntheticData(_Strict):
    """Generated data, drawn exactly like ``np.random.seed(seed); np.random.<kind>(...)``."""

    kind: Literal["normal", "uniform"] = "normal"
    shape: tuple[PositiveInt, ...]
    seed: int = 0
    mean: float = 0.0
    std: float = Field(1.0, gt=0)
    low: float = 0.0
    high: float = 1.0

    @field_validator("shape")
    @classmethod
    def _rank(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) < 2:
            msg = "a shape of at least 2 dimensions (rows, features...), e.g. [100, 12]"
            raise ValueError(msg)
        elements = math.prod(shape)
        if elements > MAX_SYNTHETIC_ELEMENTS:
            raise _KeyedError(
                "data.synthetic.shape",
                f"at most {MAX_SYNTHETIC_ELEMENTS:,} values (8 GiB as float32)",
                f"{list(shape)} = {elements:.3g} values ({4 * elements / 2**30:.3g} GiB)",
                "use fewer rows or features, e.g. shape = [1000, 12]",
            )
        return shape


class DataSpec(_Strict):
    """Where the rows come from and what the target is.

    ``target``: ``"input"`` (autoencoder: target = input), a column name (csv /
    parquet) or an array name (npz). ``target_path``: a second file holding the
    target (npy / npz / csv / parquet).
    """

    synthetic: SyntheticData | None = None
    path: str | None = None
    sklearn: Literal["digits", "iris", "wine", "breast_cancer", "diabetes"] | None = None
    target: str | None = None
    """None: the input (synthetic data, files) or the dataset's own target (sklearn)."""
    target_path: str | None = None
    features: list[str] | None = None
    x_key: str = "x"
    x_keys: dict[str, str] | list[str] | None = None
    """Several inputs (a multi-input model, ``fit(x={name: array})`` / ``fit(x=[...])``):
    ``{input name = npz array name}`` or a list of npz array names; replaces ``x_key``."""
    targets: dict[str, str] | list[str] | None = None
    """Several targets (a multi-output model): ``{output name = npz array name}`` or a list of
    npz array names; replaces ``target``."""
    row_seed: int | None = Field(None, ge=0)
    """Permute the rows once with this seed before the validation split (same for every
    variant and seed); default: keep the file's order, as ``fit`` does."""
    standardize: bool = False
    """Scale features to zero mean, unit variance with statistics of the training split
    only (and the target too when it is the input)."""
    sample_weight: str | None = None
    """Per-row loss weights, as ``fit(sample_weight=...)``: a column (csv / parquet) or array
    (npz) name of this source -- never a feature -- or a file of its own (``.npy``). Split
    with the rows by ``validation_split`` (the validation loss is weighted too)."""
    validation: DataSpec | None = None
    """A second source for the validation rows, as ``fit(validation_data=...)``: a table with
    the keys of ``[data]`` (``[data.validation]``), its own ``sample_weight`` included."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("synthetic", "path", "sklearn") if getattr(self, k) is not None]
        if len(given) != 1:
            raise _KeyedError(
                "data",
                "exactly one of `synthetic`, `path` or `sklearn`",
                " and ".join(given) if given else "none",
                'keep one data source: synthetic = {...}, path = "file" or sklearn = "digits"',
            )
        inner = self.validation
        if inner is not None and (inner.validation is not None or inner.standardize):
            raise _KeyedError(
                "data.validation",
                "a data source (path / synthetic / sklearn, target, features, sample_weight)",
                "`validation` or `standardize` inside it",
                "set standardize in [data] (validation rows use the training statistics)",
            )
        return self

    def target_is_input(self) -> bool:
        """Is the target the input itself (an autoencoder)?"""
        if self.synthetic is not None:
            return True
        if self.sklearn is not None:  # the dataset's own target unless input is asked for
            return self.target == "input"
        return self.target in (None, "input") and self.target_path is None and self.targets is None


class OptimizerSpec(_Strict):
    """``{name = "adam", learning_rate = 1e-3, ...}``: a keras.optimizers name and its kwargs.

    ``learning_rate`` may be a schedule: ``{schedule = "ExponentialDecay",
    initial_learning_rate = 0.01, decay_steps = 100, decay_rate = 0.9}`` (any class of
    ``keras.optimizers.schedules`` and its arguments).
    """

    model_config = ConfigDict(extra="allow")
    name: str


class ObjectSpec(_Strict):
    """``{name = "sparse_categorical_crossentropy", from_logits = true}``: a Keras loss or
    metric by name (snake_case function name or class name) with constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str


class EarlyStoppingSpec(_Strict):
    """``keras.callbacks.EarlyStopping``'s arguments and defaults (``[train.early_stopping]``).

    Every seed stops on its own, inside the one compiled program: see docs/engine.md.
    ``restore_best_weights`` changes only the weights left at the end, never the History (fit
    restores them after the last epoch), and ablab records the History: it is accepted and
    has no effect on what is stored.
    """

    monitor: str = "val_loss"
    min_delta: float = 0.0
    patience: int = Field(0, ge=0, le=MAX_EPOCHS)
    mode: Literal["auto", "min", "max"] = "auto"
    baseline: float | None = None
    restore_best_weights: bool = False
    start_from_epoch: int = Field(0, ge=0, le=MAX_EPOCHS)
    verbose: int = 0
    """Accepted for a ``keras.callbacks.EarlyStopping`` object's sake; ablab prints nothing."""


class ReduceLROnPlateauSpec(_Strict):
    """``keras.callbacks.ReduceLROnPlateau``'s arguments and defaults
    (``[train.reduce_lr_on_plateau]``).

    Every seed lowers its own learning rate, inside the one compiled program (see
    docs/engine.md); the History then records ``learning_rate`` per epoch, as ``fit``'s does.
    The optimizer's learning rate must be a number (Keras cannot lower a schedule).
    """

    monitor: str = "val_loss"
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    patience: int = Field(10, ge=0, le=MAX_EPOCHS)
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = 1e-4
    cooldown: int = Field(0, ge=0, le=MAX_EPOCHS)
    min_lr: float = Field(0.0, ge=0.0)
    verbose: int = 0
    """Accepted for a ``keras.callbacks.ReduceLROnPlateau`` object's sake; ablab prints
    nothing."""


VECTORIZED_CALLBACKS = {
    "EarlyStopping": "early_stopping",
    "ReduceLROnPlateau": "reduce_lr_on_plateau",
}
"""Keras callbacks ablab runs per seed inside its program -> their ``[train]`` key."""


def callback_spec(callback: Any, *, where: str = "callbacks") -> tuple[str, dict[str, Any]]:
    """``(train key, arguments)`` of a Keras callback ablab runs per seed -- a
    ``keras.callbacks.EarlyStopping`` or ``ReduceLROnPlateau`` object, or a table ``{name =
    "EarlyStopping", patience = 3}``; any other callback raises (why, and the fix: the
    ``model.fit`` engine).

    Reads the object's public attributes (no Keras import: the study layer loads without it).
    """
    if isinstance(callback, Mapping):
        args = dict(callback)
        name = str(args.pop("name", args.pop("class_name", "")))
    else:
        cls = type(callback)
        name = cls.__name__ if cls.__module__.split(".")[0] == "keras" else ""
        args = {}
        if name == "EarlyStopping":
            baseline = getattr(callback, "baseline", None)
            args = {
                "monitor": callback.monitor,
                "min_delta": abs(float(callback.min_delta)),
                "patience": int(callback.patience),
                "mode": callback.mode,
                "baseline": None if baseline is None else float(baseline),
                "restore_best_weights": bool(callback.restore_best_weights),
                "start_from_epoch": int(callback.start_from_epoch),
            }
        elif name == "ReduceLROnPlateau":
            args = {
                "monitor": callback.monitor,
                "factor": float(callback.factor),
                "patience": int(callback.patience),
                "mode": callback.mode,
                "min_delta": abs(float(callback.min_delta)),
                "cooldown": int(callback.cooldown),
                "min_lr": float(callback.min_lr),
            }
        elif not name:
            name = f"{cls.__module__}.{cls.__qualname__}"
    key = VECTORIZED_CALLBACKS.get(name)
    if key is None:
        raise _KeyedError(
            where,
            "a callback ablab runs per seed inside its compiled program: "
            f"{sorted(VECTORIZED_CALLBACKS)}",
            repr(name or callback),
            "a Python callback runs on the host between optimizer steps, and ablab trains "
            "all seeds in one compiled program, so it cannot call it; train with plain "
            'model.fit instead: `ablab run --engine reference` or [engine] kind = "reference"',
            relative=True,
        )
    return key, args


class TrainSpec(_Strict):
    """``model.compile`` / ``model.fit`` arguments, with Keras' own defaults."""

    optimizer: str | OptimizerSpec = "rmsprop"
    loss: str | ObjectSpec | dict[str, str | ObjectSpec] = Field(union_mode="left_to_right")
    """A Keras loss, or ``{output name = loss}``: one per output of a multi-output model."""
    metrics: list[str | ObjectSpec] = Field(default_factory=list)
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(FIT_DEFAULT_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    validation_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE)
    shuffle: bool = True
    class_weight: dict[int, float] | None = None
    """``{class index: weight}`` (TOML: ``{0 = 1.0, 1 = 2.0}``): each training row's loss is
    weighted by its class's weight, as ``fit(class_weight=...)`` does (validation unweighted)."""
    steps_per_epoch: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    """Batches per epoch, as ``fit(steps_per_epoch=...)`` with arrays: an epoch takes the next
    ``steps_per_epoch`` batches of a pass over the rows, a new pass starting when one ends."""
    early_stopping: EarlyStoppingSpec | None = None
    """``keras.callbacks.EarlyStopping``'s arguments: each seed stops on its own."""
    reduce_lr_on_plateau: ReduceLROnPlateauSpec | None = None
    """``keras.callbacks.ReduceLROnPlateau``'s arguments: each seed lowers its own rate."""
    dtype_policy: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    """The Keras dtype policy the model is built under (``keras.mixed_precision``)."""

    @model_validator(mode="before")
    @classmethod
    def _callbacks(cls, data: Any) -> Any:
        """``callbacks = [...]`` (Keras callback objects, in code, or ``{name = ...}`` tables):
        the ones ablab runs per seed become their own keys (``early_stopping``,
        ``reduce_lr_on_plateau``); any other is
        refused with the reason (:func:`callback_spec`)."""
        if not isinstance(data, Mapping) or "callbacks" not in data:
            return data
        data = dict(data)
        callbacks = data.pop("callbacks") or []
        for i, cb in enumerate(callbacks if isinstance(callbacks, list | tuple) else [callbacks]):
            key, spec = callback_spec(cb, where=f"callbacks[{i}]")
            if data.get(key) is not None:
                raise _KeyedError(
                    f"callbacks[{i}]",
                    f"one {key} setting",
                    f"both `{key}` and a callback for it",
                    "keep one of them",
                    relative=True,
                )
            data[key] = spec
        return data

    @model_validator(mode="after")
    def _finite_optimizer(self) -> TrainSpec:
        """Every number among the optimizer's arguments is finite, and learning rates are not
        negative: SGD with learning_rate = -1 or nan trains every seed into NaN."""
        if isinstance(self.optimizer, str):
            return self
        for key, value in _numbers(dict(self.optimizer.model_extra or {})):
            rate = key.rsplit(".", 1)[-1] in ("learning_rate", "initial_learning_rate")
            if not math.isfinite(value) or (rate and value < 0):
                raise _KeyedError(
                    f"optimizer.{key}",
                    "a finite number" + (" >= 0" if rate else ""),
                    repr(value),
                    "use a positive learning rate, e.g. 1e-3"
                    if rate
                    else "give a finite value (see the keras.optimizers argument's docs)",
                    relative=True,
                )
        return self

    @model_validator(mode="after")
    def _plateau_needs_a_number(self) -> TrainSpec:
        """ReduceLROnPlateau sets the optimizer's learning rate: a schedule has none to set
        (``fit`` raises TypeError at the first reduction)."""
        if self.reduce_lr_on_plateau is None or isinstance(self.optimizer, str):
            return self
        lr = (self.optimizer.model_extra or {}).get("learning_rate")
        if isinstance(lr, Mapping):
            raise _KeyedError(
                "reduce_lr_on_plateau",
                "an optimizer whose learning_rate is a number",
                f"learning_rate = {dict(lr)!r} (a schedule)",
                "give the optimizer a number as learning_rate, or drop ReduceLROnPlateau "
                "(Keras cannot lower a schedule's rate either)",
                relative=True,
            )
        return self

    def optimizer_config(self) -> dict[str, Any]:
        """The optimizer as ``keras.optimizers.get`` takes it (JSON: it also goes to the
        other backends' worker processes)."""
        if isinstance(self.optimizer, str):
            return {"class_name": self.optimizer, "config": {}}
        kwargs = dict(self.optimizer.model_extra or {})
        lr = kwargs.get("learning_rate")
        if isinstance(lr, int) and not isinstance(lr, bool):
            kwargs["learning_rate"] = lr = float(lr)  # TOML's `1000`: Keras wants a float
        if isinstance(lr, dict):
            sched = dict(lr)
            name = sched.pop("schedule", None) or sched.pop("name", None)
            kwargs["learning_rate"] = {
                "module": "keras.optimizers.schedules",
                "class_name": str(name),
                "config": sched,
                "registered_name": None,
            }
        return {"class_name": self.optimizer.name, "config": kwargs}

    @property
    def loss_name(self) -> str:
        """The loss's name in snake_case, lower-cased (``mse``, ``sparse_categorical_...``);
        ``per_output`` for one loss per output."""
        if isinstance(self.loss, dict):
            return "per_output"
        name = self.loss if isinstance(self.loss, str) else self.loss.name
        return snake_case(name) if name[:1].isupper() else name.lower()

    def loss_config(self) -> str | dict[str, Any]:
        """The loss as ``keras.losses.get`` takes it; per output: ``{output: that}``."""
        if isinstance(self.loss, dict):
            return {k: keras_object_config(v) for k, v in self.loss.items()}
        return keras_object_config(self.loss)

    def metric_configs(self) -> list[str | dict[str, Any]]:
        return [keras_object_config(m, metric=True) for m in self.metrics]

    def metric_names(self) -> list[str]:
        """The History names of the metrics (see :func:`metric_name`)."""
        return [metric_name(m) for m in self.metrics]


def _numbers(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    """``(dotted key, value)`` of every number inside ``table`` (nested tables included)."""
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


class ModelSpec(_Strict):
    """The model: an inline layer list, or a builder ``file.py:function`` / ``module:function``.

    A builder is called with ``params`` (updated by the variant's ``params``) as
    keyword arguments and returns an uncompiled ``keras.Model``. It may also be a saved
    architecture, ``"file.json"`` (``model.to_json()``, beside the study; rebuilt fresh, no
    weights), or -- in code -- a ``keras.Model`` object (cloned: its architecture, not its
    weights).
    """

    layers: list[dict[str, Any]] | None = None
    builder: str | Callable[..., Any] | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if self.layers is not None and self.builder is not None:
            raise _KeyedError("model", "either `layers` or `builder`", "both", "remove one of them")
        return self


class VariantSpec(_Strict):
    """One variant: its own layer list, or builder parameters, and optional train overrides."""

    layers: list[dict[str, Any]] | None = None
    builder: str | Callable[..., Any] | None = None
    """This variant's own builder (any form ``[model] builder`` takes), instead of
    ``[model]``'s: variants that are different model functions (``ablab.ablate``)."""
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


class SeedSpec(_Strict):
    """Seeds ``base, base + 1, ..., base + count - 1``; seed i is paired across variants."""

    count: int = Field(1000, ge=1, le=MAX_SEEDS)
    base: int = Field(0, ge=0, lt=2**31)


class EngineSpec(_Strict):
    """Which engine trains the seeds, and how the vectorized one splits them into chunks (one
    compiled program per variant). ``kind = "reference"`` runs plain ``model.fit`` per seed
    (slower; for models the vectorized engine cannot trace), from the same initial weights
    and data order, into the same tables."""

    kind: Literal["vectorized", "reference"] = "vectorized"
    memory_budget_mb: float = Field(2048.0, ge=MIN_MEMORY_BUDGET_MB, le=MAX_MEMORY_BUDGET_MB)
    """Bounds one chunk (its seeds x an estimate per seed), and the chunks in flight at once;
    a study whose single seed needs more is refused before anything is allocated."""
    chunk_size: int | None = Field(None, ge=1, le=MAX_SEEDS)
    workers: int | None = Field(None, ge=1, le=1024)
    """Chunk calls the local executor runs at once (``ablab.engine.sizing.default_workers()`` when
    unset: one per CPU core, 1 on an accelerator), as many as the memory budget holds.
    Results do not depend on it."""


def default_pairs(variants: Iterable[str], baseline: str) -> list[tuple[str, str]]:
    """The comparisons a study makes without ``[verdicts] pairs``: every variant but the
    baseline against the baseline, in the variants' order."""
    return [(v, baseline) for v in variants if v != baseline]


class VerdictSpec(_Strict):
    """How variants are compared with the baseline (see ``ablab.stats.rule`` for the rule).

    The equivalence margin is, by default, ``margin_sd`` (0.1) times the baseline's
    across-seed standard deviation of the metric (``ablab.stats.verdicts.equivalence_margin`` says
    why); ``margin`` (metric units) or ``margin_pct`` (percent of the baseline's |median|)
    replace it. At most one of the two may be given.
    """

    metric: str | None = None
    """History name compared at the final epoch; default val_loss (loss without validation)."""
    alpha: float = Field(0.05, gt=0, lt=1)
    margin: float | None = Field(None, ge=0)
    """Equivalence margin in the metric's own units."""
    margin_pct: float | None = Field(None, ge=0)
    """Equivalence margin in percent of the baseline's |median| (not invariant to an offset)."""
    margin_sd: float = Field(0.1, ge=0)
    """Equivalence margin as a fraction of the baseline's across-seed SD (the default rule)."""
    confidence: float = Field(0.95, gt=0, lt=1)
    n_resamples: int = Field(9999, ge=1, le=10**7)
    power: float = Field(0.8, gt=0, lt=1)
    effect: float | None = None
    """A stated effect (metric units) for seed planning; default: the observed outcomes."""
    higher_is_better: bool | None = None
    """Override the direction guessed from the metric's name."""
    random_seed: int = 0
    """Seeds the bootstrap's and the seed planner's generators (results are reproducible)."""
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    """Explicit comparisons ``[variant, baseline]`` instead of every variant vs the baseline."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_margin(cls, data: Any) -> Any:
        """Runs stored before the margin rule changed have ``margin`` (a fraction of the
        baseline median) beside ``margin_abs``: read them with the meaning they had."""
        if isinstance(data, Mapping) and "margin_abs" in data:
            data = dict(data)
            absolute, fraction = data.pop("margin_abs"), data.pop("margin", None)
            if absolute is not None:
                data["margin"] = absolute
            elif fraction is not None:
                data["margin_pct"] = 100.0 * fraction
        return data

    @model_validator(mode="after")
    def _one_margin(self) -> VerdictSpec:
        if self.margin is not None and self.margin_pct is not None:
            raise _KeyedError(
                "verdicts",
                "at most one of `margin` (metric units) and `margin_pct` (percent of the "
                "baseline median)",
                f"margin = {self.margin!r} and margin_pct = {self.margin_pct!r}",
                "keep one of them (or neither: 0.1 x the baseline's across-seed SD)",
            )
        return self


class ChecksSpec(_Strict):
    """Checks that catch framework bugs instead of believing them (``ablab.analysis.checks``)."""

    equivalent: list[list[str]] = Field(default_factory=list)
    """Groups of variants that must train identically from identical initial weights."""
    identity_probe: bool | list[str] = False
    """Insert Activation('linear') after every layer of these variants (true: all) and
    check the trajectory does not change."""
    backends: list[Literal["jax", "torch", "tensorflow"]] | None = None
    """model.fit under these Keras backends vs the engine (jax = the fidelity check).
    Not declared: `ablab run` skips them and `ablab check` runs all three."""
    seeds: int = Field(3, ge=1, le=10_000)
    """Seeds per variant that the trajectory and backend checks train."""
    tolerance: float = Field(1e-5, gt=0)
    """Equivalence / identity probe: max |a - b| / max(|a|, |b|, 1) over steps and weights."""
    fidelity_tolerance: float = Field(1e-4, gt=0)
    """JAX model.fit vs the engine: max relative deviation per epoch."""
    backend_tolerance: float = Field(1e-4, gt=0)
    """torch / tensorflow model.fit vs the engine: max relative deviation per epoch."""


class ProbesSpec(_Strict):
    """What the engine records besides the History (``ablab.engine.probes``)."""

    enabled: bool | Literal["auto"] = "auto"
    """true, false, or "auto": on for models up to ``max_params`` parameters."""
    max_params: PositiveInt = 100_000
    seeds: int = Field(1000, ge=1, le=MAX_SEEDS)
    """Probe at least this many seeds per variant (the first seed chunks that cover them);
    the other chunks run without probes. Probes are long tables (one row per seed, step and
    quantity): at 100,000 seeds they would outweigh the History many times over, while the
    explanations they feed are medians that 1,000 seeds pin down."""


Scalar = bool | int | float | str


class SweepArm(_Strict):
    """One trained arm of a swept study: a declared variant at one sweep point."""

    variant: str
    point: dict[str, Scalar]


class Study(_Strict):
    """A validated study. Build in code or load with :func:`load_study`."""

    name: str = "study"
    description: str = ""
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec
    variants: dict[str, VariantSpec] = Field(default_factory=lambda: {"default": VariantSpec()})
    baseline: str | None = None
    seeds: SeedSpec = Field(default_factory=SeedSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    verdicts: VerdictSpec = Field(default_factory=VerdictSpec)
    checks: ChecksSpec = Field(default_factory=ChecksSpec)
    probes: ProbesSpec = Field(default_factory=ProbesSpec)
    sweep: dict[str, list[Scalar]] = Field(default_factory=dict)
    """Sweep axes crossed with the variants (``ablab.study.sweep``): ``batch_size = [8, 16]``."""
    arms: dict[str, SweepArm] = Field(default_factory=dict)
    """Set by the sweep expansion: each variant (arm) name -> declared variant and point."""
    source: str = "<in code>"
    """Where the study came from: its file, or ``<in code>``."""
    root: str = "."
    """Directory that relative paths (data, builder files) are resolved against."""

    @model_validator(mode="after")
    def _check(self) -> Study:
        if not self.variants:
            raise _KeyedError(
                "variants", "at least one variant", "none", "add a [variants.NAME] table"
            )
        if self.baseline is None:
            self.baseline = next(iter(self.variants))
        if self.baseline not in self.variants:
            raise _KeyedError(
                "variants.baseline",
                f"one of the variants {list(self.variants)}",
                repr(self.baseline),
                "name an existing variant",
            )
        for name, variant in self.variants.items():
            if name in self.arms:  # a sweep arm, named by the expansion: variant@axis=value
                pass
            elif not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.~+-]*", name) or name == "baseline":
                raise _KeyedError(
                    f"variants.{name}",
                    "a name of letters, digits and _ . ~ + - (not 'baseline')",
                    repr(name),
                    "rename the variant, e.g. bn_after",
                )
            if variant.builder is not None and (
                variant.layers is not None or self.model.layers is not None
            ):
                raise _KeyedError(
                    f"variants.{name}",
                    "either a layer list or a builder",
                    "both `layers` and `builder`",
                    "remove one of them",
                )
            if (
                self.model.builder is None
                and variant.builder is None
                and self.model.layers is None
                and variant.layers is None
            ):
                raise _KeyedError(
                    f"variants.{name}.layers",
                    "a layer list",
                    "nothing",
                    "give the variant `layers = [...]`, or [model] layers / builder",
                )
            if self.model.builder is not None and variant.layers is not None:
                raise _KeyedError(
                    f"variants.{name}",
                    "`params` for the builder",
                    "`layers`",
                    "a builder study varies builder params; drop `layers`",
                )
        for i, group in enumerate(self.checks.equivalent):
            unknown = [g for g in group if g not in self.variants]
            if len(group) < 2 or unknown:
                raise _KeyedError(
                    f"checks.equivalent[{i}]",
                    f"two or more of the variants {list(self.variants)}",
                    repr(group),
                    'list existing variant names, e.g. ["a", "b"]',
                )
        for i, pair in enumerate(self.verdicts.pairs):
            unknown = [v for v in pair if v not in self.variants]
            if unknown:
                raise _KeyedError(
                    f"verdicts.pairs[{i}]",
                    f"variants among {list(self.variants)}",
                    repr(list(pair)),
                    "name existing variants: [variant, baseline]",
                )
        probe = self.checks.identity_probe
        for name in probe if isinstance(probe, list) else []:
            if name not in self.variants:
                raise _KeyedError(
                    "checks.identity_probe",
                    f"variants among {list(self.variants)}",
                    repr(name),
                    "name existing variants, or use true for all",
                )
        return self

    # -- resolution -----------------------------------------------------------------
    def comparison_pairs(self) -> list[tuple[str, str]]:
        """``[verdicts] pairs``, else :func:`default_pairs` of the variants."""
        return list(self.verdicts.pairs) or default_pairs(self.variants, str(self.baseline))

    def variant_train(self, variant: str) -> TrainSpec:
        """The train spec of ``variant``: ``[train]`` updated with the variant's overrides."""
        overrides = self.variants[variant].train
        if not overrides:
            return self.train
        merged = {**self.train.model_dump(exclude_unset=False), **overrides}
        try:
            return TrainSpec.model_validate(merged)
        except ValidationError as exc:
            from ablab.study.loading import to_study_error  # loading builds on this module

            raise to_study_error(exc, self.source, prefix=f"variants.{variant}.train") from exc

    def variant_layers(self, variant: str) -> list[dict[str, Any]] | None:
        spec = self.variants[variant]
        return spec.layers if spec.layers is not None else self.model.layers

    def variant_params(self, variant: str) -> dict[str, Any]:
        return {**self.model.params, **self.variants[variant].params}

    def with_seeds(self, count: int | None = None, base: int | None = None) -> Study:
        """A copy with the seed count / base replaced (``--seeds N``)."""
        if count is not None and not 1 <= count <= MAX_SEEDS:
            raise StudyError(
                where=self.source,
                key="seeds.count",
                expected=f"a number of seeds from 1 to {MAX_SEEDS:,}",
                got=repr(count),
                fix=f"pass --seeds N with 1 <= N <= {MAX_SEEDS:,}",
            )
        seeds = self.seeds.model_copy(
            update={k: v for k, v in {"count": count, "base": base}.items() if v is not None}
        )
        return self.model_copy(update={"seeds": seeds})

    def resolved(self) -> dict[str, Any]:
        """A JSON-able dict of the whole resolved study (callables named by qualname)."""
        data = self.model_dump(mode="python")
        if callable(self.model.builder):
            data["model"]["builder"] = callable_name(self.model.builder)
        for name, variant in self.variants.items():
            if callable(variant.builder):
                data["variants"][name]["builder"] = callable_name(variant.builder)
        return data

    def __init__(self, /, **data: Any) -> None:
        """Validate like :func:`ablab.study_from_dict`: bad input raises :class:`StudyError`
        (where, key, expected, got, fix), not pydantic's ``ValidationError`` -- also through
        ``Study.model_validate``, which pydantic routes through this method."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            from ablab.study.loading import to_study_error  # loading builds on this module

            raise to_study_error(exc, str(data.get("source", "<in code>"))) from exc


def callable_name(obj: Any) -> str:
    """How a stored study names an in-code builder: ``<callable module.qualname>`` (a model
    object: ``<callable module.Class instance>``). A fresh process cannot rebuild from it."""
    qualname = getattr(obj, "__qualname__", None)
    if qualname is None:  # an instance (a keras.Model object)
        return f"<callable {type(obj).__module__}.{type(obj).__qualname__} instance>"
    return f"<callable {getattr(obj, '__module__', '?')}.{qualname}>"
