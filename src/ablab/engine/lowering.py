"""Lowerings XLA's CPU backend runs well, used while the engine traces a program.

Keras' JAX backend turns ``Conv*D`` into ``lax.conv_general_dilated`` and pooling into
``lax.reduce_window``. Inside the engine's program (``vmap`` over seeds, ``lax.scan`` over
steps) XLA's CPU backend runs the per-seed kernel-gradient convolution and the max-pool
backward pass (``select_and_scatter``) on its generic loop emitter: on the digits CNN they
were 43 % and ~20 % of the op time at ~0.2 GFLOP/s (issue 17). The same mathematics as
matrix products and reshapes runs on the GEMM library instead:

* ``conv`` -- **im2col**: the input's patches gathered by static strided slices into
  ``(k_1 * .. * k_n * channels, batch * out)`` and one matmul computed transposed,
  ``(filters, batch * out) = kernel^T @ patches``, then transposed back. Under ``vmap``
  with the input shared by every seed (the first layer) this is one GEMM with ``seeds *
  filters`` rows; its kernel gradient is one GEMM too. Any stride, dilation, ``valid`` /
  ``same`` padding, channels last or first; grouped convolutions keep Keras' own lowering.
* ``max_pool`` / ``average_pool`` -- **reshape + reduce** when the windows tile the input
  (``strides == pool_size``, ``valid`` padding or a size the pool divides): the input is
  cropped to whole windows, reshaped to ``(.., out, pool, ..)`` and reduced. Max pooling
  keeps ``reduce_window``'s gradient exactly (a custom VJP sends each window's gradient to
  its *first* maximum in row-major window order, as XLA's ``select_and_scatter`` with
  ``>=`` does; ``jnp.max``'s own gradient would split ties).
* ``moments`` (``norm``) -- **per-channel sums over a wide minor axis**: BatchNormalization's
  batch statistics reduce every axis but the channels. XLA's CPU reduction of a
  ``(rows, C)`` array with a narrow ``C`` (8 filters) ran at ~10 GB/s; the rows folded into
  the minor axis first (``(rows / k, k * C)`` summed over rows, then the ``k`` partial rows)
  ran it 1.5-2.6x as fast. Their derivative is written out (a custom JVP, linear in the
  tangent; reverse mode transposes it to ``(dm + 2 dv (x - mean)) / n``), without autodiff's
  extra pass over the rows for the mean's share of the variance (zero up to rounding). (The
  same fold for the sums in ``batch_normalization``'s gradient was slower: XLA then
  materializes their operands instead of fusing them into the sum.)
* ``matmul`` (``dense``) -- **a dense layer's per-seed kernel gradient as a plain batched
  product**. It applies to every float ``matmul`` whose second operand is 2-d and not empty
  (Dense layers, and also e.g. an RNN cell's products, Keras' ``Dot`` on 2-d operands: the
  same values and gradients; their speed was measured on Dense layers only). Under ``vmap``
  Keras' ``x.T @ g`` is a product contracting the rows axis of
  both ``(seeds, rows, in)`` and ``(seeds, rows, out)``, which XLA's CPU backend runs on its
  own dot emitter (~5 GFLOP/s for the seed autoencoder's 32 x 8 x 12 products). ``g`` is
  transposed and materialized first, the product ``(out, rows) @ (rows, in)`` goes to the
  GEMM library, and its ``(out, in)`` result is transposed after (issue 17).
  ``bench/dense_grad.py`` on the 2-core VM: the seed autoencoder's (834 seeds) 0.81 -> 0.30
  ms a product, the W=512 digits MLP's output layer (10 seeds) 0.94 -> 0.16 ms. Each transpose
  is kept behind an optimization barrier: XLA folds an unmaterialized one back into the
  product. A small float32 kernel's forward product (at most 16 inputs and 16 outputs) is a
  broadcast multiply + sum that XLA fuses into one loop (:func:`_forward_product`: the
  seed autoencoder 1.05-1.15x). A custom VJP has no forward mode: ``jax.jvp`` /
  ``jacfwd`` through a lowered matmul raises (nothing in the engine uses forward mode; the
  max pool's custom VJP has the same limit, BatchNormalization's moments a custom JVP that
  keeps it).
* ``matmul`` of a small kernel (``small``) -- **per-seed products on a compiled kernel**. A
  float32 kernel of at most 16 inputs and 16 outputs, per seed, has its forward product,
  input gradient and kernel gradient run by ``ablab.engine.small_products`` (an XLA FFI
  custom call, C++ built on first use) instead of XLA's GEMM library: seed autoencoder
  1.35x, + BN 1.3x (issue 17). Chosen when vmap batches the kernel (a custom batching
  rule); an input shared by every seed (a first layer's data) is read by every seed's
  product. Left out where the kernel cannot be built (no C++ compiler) or on an
  accelerator: the products are then the ``dense`` forms above. The custom call has no
  derivative of its own: like the custom VJPs here, no forward mode and no second
  derivative through it (the engine takes neither).
* a convolution's small product (``conv`` with ``small``) -- **the im2col product on the same
  kernel** where it is as small (window elements x input channels <= 16, filters <= 16: the
  digits CNN's 3 x 3 x 1 -> 8): the patches laid out ``(rows, window x channels)`` and the
  product per seed, written in the per-seed channels-last layout the bias, activation and
  pooling read (the transposed GEMM above left a relayout of the whole feature map per step).
* ``add`` of a feature map's bias (``bias``) -- **the bias gradient as a wide channel sum**,
  in a program compiled with YNNPACK's fusions (BatchNormalization on feature maps,
  ``ablab.engine.xla.wants_library_fusions``; :func:`lowered`'s ``library_fusions``):
  ``x + b`` with ``x`` of rank >= 4 (a Conv2D's / Conv3D's output, channels last) and one
  ``b`` per channel has a custom VJP whose bias gradient is :func:`channel_sum` (XLA rewrote
  Keras' sum over batch x height x width into a windowed reduction, ~1 GB/s): digits CNN +
  BN 1.04-1.06x. Without those fusions it ran slower -- the digits CNN 0.82x, its
  LayerNormalization variant 0.88x: the gradient feeding the sum also feeds the
  convolution's kernel gradient, and XLA computed it twice, once in each consumer's shape
  (the LayerNorm backward, 0.57 ms in the folded shape beside 0.13 ms in the other) -- so
  there Keras' add stays. A Dense layer's bias keeps Keras' add too: there it ran slower.
* ``max_pool`` on the compiled kernel (``maxpool``) -- **max pooling in one pass, forward and
  backward**: 1-d / 2-d windows that tile the input (as for ``pool``), float32; the forward
  pass keeps, per output, the byte offset XLA's ``select_and_scatter`` (``>=``) would send
  the gradient to, and the backward pass writes each gradient there and zeros elsewhere.
  Bit-identical to Keras' ``reduce_window`` values and gradients, ties and NaN included.
  XLA ran the reshape form's window transpose, the relu / pool backward and its argmax as
  loop fusions at ~2 ns an element. The digits CNN, interleaved A/B on the peer
  benchmark's programs (5 rounds): the conv product on the kernel 1.23x, + ``maxpool``
  1.51x, + ``bias`` 1.74x (with BN 1.26x / 1.52x / 1.56x), against the lowerings without them.
* ``Adam.update_step`` (``adam``) -- **Keras' Adam update in one pass on the same library**.
  Keras' ``update_step`` (3.15's, without amsgrad; re-stated here with its slots through
  ``ablab._keras.adam_slots``) computes the same scalars, then updates the flattened
  variable and its two moments with ``small_products.adam`` when vmap batches them: XLA ran
  three loops per variable over arrays that live in L3 at the engine's cell sizes (~2 ns an
  element); the seed autoencoder 1.40x, + BN 1.30x on top of ``small`` (issue 17). amsgrad,
  other dtypes, no vmap: Keras' own elementwise code.

The results are the same functions; only float32 summation order changes (a convolution
sums its products in another order, a channel's statistics its rows).
``tests/test_lowering.py`` checks each lowering against Keras' own for values and
gradients, and the engine with the lowerings against ``model.fit`` within the fidelity
tolerances of tests/test_reference.py.

The lowerings apply only while :func:`lowered` is active in the tracing thread -- the engine
enters it around tracing its programs; the user's model, ``model.fit`` and any other Keras
code in the process keep Keras' lowering. ``$ABLAB_LOWERINGS`` turns them off (``0``) or
selects some (``conv,pool,norm,dense,bias,small,adam,maxpool``; ``all``) for A/B
benchmarks. JAX caches a trace by the traced function's identity, not by the lowering in
force: trace a fresh function inside :func:`lowered` (the engine does: one new function per
compiled program).
"""

from __future__ import annotations

import contextvars
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ablab._keras import adam_slots, keras_backend_nn, keras_backend_numpy
from ablab.engine import small_products
from ablab.errors import InputError

ENV = "ABLAB_LOWERINGS"
ALL = frozenset({"conv", "pool", "norm", "dense", "bias", "small", "adam", "maxpool"})
DEFAULT = ALL
"""On a CPU backend when ``$ABLAB_LOWERINGS`` is unset (:func:`enabled`); ``small``,
``adam`` and ``maxpool`` only where their kernel builds (``ablab.engine.small_products``)."""
NEEDS_KERNEL = frozenset({"small", "adam", "maxpool"})

_ACTIVE: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "ablab_lowerings", default=frozenset()
)
_LIBRARY_FUSIONS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ablab_library_fusions", default=False
)
"""Is the program being traced compiled with XLA's YNNPACK fusions
(``ablab.engine.xla.wants_library_fusions``)? ``bias`` applies only there."""


def enabled() -> frozenset[str]:
    """The lowerings ``$ABLAB_LOWERINGS`` asks for: when unset, :data:`DEFAULT` on a CPU
    backend and none on an accelerator (they are layouts XLA's *CPU* backend runs well; a
    GPU's compiler has its own convolution and reduction kernels, and nothing was measured
    there); :data:`DEFAULT` for ``1``, every one for ``all``, none for ``0`` / ``off``, else
    the comma-separated names (``conv``, ``pool``, ``norm``, ``dense``, ``bias``, ``small``,
    ``adam``, ``maxpool``; ``bias`` changes only programs compiled with YNNPACK's fusions,
    see :func:`lowered`). ``small``, ``adam`` and ``maxpool`` need their kernel
    (``ablab.engine.small_products``, a CPU custom call): left out of the default and ``all``
    where it cannot be built or the backend is not a CPU, an error when named there."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting == "":
        if jax.default_backend() != "cpu":
            return frozenset()
        return _with_kernel(DEFAULT)
    if setting in ("1", "on", "true", "yes"):
        return _with_kernel(DEFAULT)
    if setting == "all":
        return _with_kernel(ALL)
    if setting in ("0", "off", "none", "false", "no"):
        return frozenset()
    names = frozenset(s.strip() for s in setting.split(",") if s.strip())
    unknown = names - ALL
    if unknown:
        raise InputError(
            where="the environment",
            key=f"${ENV}",
            expected=f"0, 1, all, or a comma-separated subset of {sorted(ALL)}",
            got=f"{setting!r} (unknown lowering(s) {sorted(unknown)})",
            fix=f"unset {ENV} (the default lowerings) or use e.g. {ENV}=conv,pool",
        )
    if names & NEEDS_KERNEL and not _kernel_runs_here():
        why = (
            f"the kernel runs on a CPU backend only, not {jax.default_backend()!r}"
            if jax.default_backend() != "cpu"
            else f"the kernel: {small_products.unavailable_reason()}"
        )
        raise InputError(
            where="the environment",
            key=f"${ENV}",
            expected=f"{sorted(names & NEEDS_KERNEL)} only on a CPU backend where their kernel "
            "builds (a C++ compiler)",
            got=f"{setting!r}; {why}",
            fix="install a C++ compiler (or set $CXX), or leave "
            f"{' and '.join(sorted(names & NEEDS_KERNEL))} out of {ENV}",
        )
    return names


def _kernel_runs_here() -> bool:
    """Does the compiled kernel run here: a CPU backend (it is a CPU custom call) and the
    kernel built and loaded (``small_products.available``)?"""
    return jax.default_backend() == "cpu" and small_products.available()


def _with_kernel(names: frozenset[str]) -> frozenset[str]:
    """``names`` less :data:`NEEDS_KERNEL` where their kernel does not run."""
    if names & NEEDS_KERNEL and not _kernel_runs_here():
        return names - NEEDS_KERNEL
    return names


@contextmanager
def lowered(
    names: frozenset[str] | None = None, *, library_fusions: bool = False
) -> Iterator[frozenset[str]]:
    """Trace with the lowerings ``names`` (default :func:`enabled`) in this thread, for a
    program compiled with (``library_fusions``) or without XLA's YNNPACK fusions: ``bias``
    applies only with them (measured faster there and slower without)."""
    active = enabled() if names is None else frozenset(names)
    token = _ACTIVE.set(active)
    fusions = _LIBRARY_FUSIONS.set(library_fusions)
    try:
        yield active
    finally:
        _LIBRARY_FUSIONS.reset(fusions)
        _ACTIVE.reset(token)


# -- convolution as im2col + matmul ----------------------------------------------------------


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """XLA's ``SAME`` padding of one spatial axis: (low, high)."""
    out = -(-size // stride)
    span = (k - 1) * dilation + 1
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def conv_im2col(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: str,
    dilation: Sequence[int],
    on_kernel: bool = False,
) -> jax.Array:
    """An N-d channels-last convolution ``x`` (batch, *spatial, C) * ``kernel`` (*k, C, O) as
    im2col + one matmul (Keras' / ``lax.conv_general_dilated``'s semantics).

    The patches are laid out window-offset-major, ``(k_1 * .. * k_n * C, batch * out)``, and
    the product is computed transposed, ``(O, batch * out) = kernel^T @ patches``, then
    transposed back: stacking each offset's slice whole is a plain copy (interleaving them
    as the minor axis was a strided scatter), the forward product is a GEMM with a long
    minor dimension, and the kernel gradient ``(k * C, O)`` contracts the minor axis of both
    operands -- the layouts XLA's CPU GEMM library runs well. On the digits CNN (issue 17;
    8 seeds a call, per-seed data order) the convolution's three ops took ~1.5 ms a step as
    ``(batch * out, k * C) @ (k * C, O)``, ~0.4 ms this way."""
    n = x.ndim - 2
    ks = kernel.shape[:n]
    if padding == "same":
        pads = [_same_pads(x.shape[1 + i], ks[i], strides[i], dilation[i]) for i in range(n)]
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(x.shape[1 + i] - (ks[i] - 1) * dilation[i] - 1) // strides[i] + 1 for i in range(n)]
    patches = []
    for offset in _window_offsets(ks):
        index: list[Any] = [slice(None)]
        for i, o in enumerate(offset):
            start = o * dilation[i]
            index.append(slice(start, start + (out[i] - 1) * strides[i] + 1, strides[i]))
        patches.append(x[tuple(index)])
    filters = kernel.shape[-1]
    flat_kernel = kernel.reshape(-1, filters)  # (k_1 * .. * k_n * C, O), offset-major
    if on_kernel:
        rows = jnp.stack(patches, axis=-2)  # (batch, *out, k_1 * .. * k_n, C)
        rows = rows.reshape(-1, flat_kernel.shape[0])
        if _small_kernel(rows, flat_kernel):
            return _matmul_small(rows, flat_kernel).reshape(x.shape[0], *out, filters)
    cols = jnp.moveaxis(jnp.stack(patches), -1, 1)  # (k_1 * .. * k_n, C, batch, *out)
    cols = cols.reshape(-1, math.prod(cols.shape[2:]))
    # the barrier keeps the product in this orientation: XLA would fold the transpose below
    # into it and run it as (batch * out, O) on its own, ~3x slower, dot emitter
    y_t = jax.lax.optimization_barrier(jnp.matmul(flat_kernel.T, cols))
    return y_t.T.reshape(x.shape[0], *out, filters)


def _window_offsets(ks: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every offset inside a window, row-major (the kernel's own flattening order)."""
    if not ks:
        yield ()
        return
    for first in range(ks[0]):
        for rest in _window_offsets(ks[1:]):
            yield (first, *rest)


def _channels_last(x: jax.Array, data_format: str) -> jax.Array:
    return x if data_format == "channels_last" else jnp.moveaxis(x, 1, -1)


def _channels_back(x: jax.Array, data_format: str) -> jax.Array:
    return x if data_format == "channels_last" else jnp.moveaxis(x, -1, 1)


def _conv(original: Callable) -> Callable:
    def conv(
        inputs: Any,
        kernel: Any,
        strides: int | Sequence[int] = 1,
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate: int | Sequence[int] = 1,
    ) -> Any:
        if "conv" not in _ACTIVE.get():
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        from ablab._keras import keras_backend

        fmt = keras_backend.standardize_data_format(data_format)
        x = jnp.asarray(inputs)
        k = jnp.asarray(kernel)
        n = x.ndim - 2
        channels = x.shape[-1] if fmt == "channels_last" else x.shape[1]
        if (
            n < 1
            or k.ndim != n + 2
            or k.shape[-2] != channels  # grouped: Keras' own lowering
            or padding not in ("valid", "same")
            or x.dtype != k.dtype
        ):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        y = conv_im2col(
            _channels_last(x, fmt),
            k,
            _tuple(strides, n),
            padding,
            _tuple(dilation_rate, n),
            on_kernel="small" in _ACTIVE.get(),
        )
        return _channels_back(y, fmt)

    conv.__wrapped__ = original  # type: ignore[attr-defined]
    return conv


# -- pooling as reshape + reduce -------------------------------------------------------------


def _tiles(
    x: jax.Array, pool: tuple[int, ...], strides: tuple[int, ...], padding: str
) -> list[int] | None:
    """The output size per spatial axis when ``pool`` windows tile channels-last ``x``
    (cropping the rest, as ``valid`` does), else None."""
    if pool != strides:
        return None
    sizes = x.shape[1:-1]
    if padding == "same" and any(s % p for s, p in zip(sizes, pool, strict=True)):
        return None
    if padding not in ("valid", "same"):
        return None
    return [s // p for s, p in zip(sizes, pool, strict=True)]


def _windows(x: jax.Array, pool: tuple[int, ...], out: list[int]) -> jax.Array:
    """Channels-last ``x`` cropped to whole windows, as (batch, *out, C, prod(pool)) with the
    window's elements in row-major order."""
    n = len(pool)
    x = x[(slice(None), *(slice(0, o * p) for o, p in zip(out, pool, strict=True)))]
    shape = [x.shape[0]]
    for o, p in zip(out, pool, strict=True):
        shape += [o, p]
    x = x.reshape(*shape, x.shape[-1])
    # (batch, o1, p1, o2, p2, .., C) -> (batch, o1, o2, .., C, p1, p2, ..)
    perm = [0, *(1 + 2 * i for i in range(n)), 1 + 2 * n, *(2 + 2 * i for i in range(n))]
    x = x.transpose(perm)
    return x.reshape(*x.shape[: n + 2], math.prod(pool))


def _unwindows(g: jax.Array, pool: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`_windows`, zero where ``_windows`` cropped: (batch, *spatial, C)."""
    n = len(pool)
    out = g.shape[1 : n + 1]
    g = g.reshape(*g.shape[: n + 2], *pool)
    perm = [0]
    for i in range(n):
        perm += [1 + i, n + 2 + i]
    perm.append(n + 1)
    g = g.transpose(perm).reshape(g.shape[0], *(o * p for o, p in zip(out, pool, strict=True)), -1)
    pads = [(0, 0)] + [(0, s - o * p) for s, o, p in zip(shape[1:-1], out, pool, strict=True)]
    return jnp.pad(g, [*pads, (0, 0)])


def _max_pool_tiled(x: jax.Array, pool: tuple[int, ...], out: list[int]) -> jax.Array:
    @jax.custom_vjp
    def pool_max(x: jax.Array) -> jax.Array:
        return jnp.max(_windows(x, pool, out), axis=-1)

    def fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        w = _windows(x, pool, out)
        y = jnp.max(w, axis=-1)
        return y, (w, y)

    def bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
        w, y = res
        first_hit = jnp.argmax(w == y[..., None], axis=-1)  # the first maximum
        first = jnp.arange(w.shape[-1]) == first_hit[..., None]
        grad = jnp.where(first, g[..., None], jnp.zeros((), g.dtype))
        return (_unwindows(grad, pool, x.shape),)

    pool_max.defvjp(fwd, bwd)
    return pool_max(x)


def _as_2d(x: jax.Array, pool: tuple[int, ...]) -> tuple[jax.Array, tuple[int, int]]:
    """A channels-last 1-d ``x`` and its pool as 2-d of height 1; 2-d as it is."""
    if len(pool) == 1:
        return x[:, None], (1, pool[0])
    return x, (pool[0], pool[1])


def _max_pool_fits(x: jax.Array, pool: tuple[int, ...]) -> bool:
    """Can the compiled kernel max-pool channels-last ``x`` (1-d or 2-d, float32)?"""
    if len(pool) not in (1, 2) or not _kernel_runs_here():
        return False
    return small_products.max_pool_fits(*_as_2d(x, pool))


def _max_pool_kernel(x: jax.Array, pool: tuple[int, ...]) -> jax.Array:
    """Max pooling over windows that tile channels-last ``x`` (cropped as ``valid`` does) on
    the compiled kernel, its gradient to each window's first maximum as ``reduce_window``'s
    (``maxpool``)."""
    one_d = len(pool) == 1
    x2, p2 = _as_2d(x, pool)

    @jax.custom_vjp
    def pool_max(x2: jax.Array) -> jax.Array:
        return small_products.max_pool(x2, p2)[0]

    def fwd(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
        return small_products.max_pool(x2, p2)  # (y, first: the residual)

    def bwd(first: jax.Array, g: jax.Array) -> tuple[jax.Array]:
        size = (x2.shape[-3], x2.shape[-2])
        return (small_products.max_pool_grad(g, first, p2, size),)

    pool_max.defvjp(fwd, bwd)
    y = pool_max(x2)
    return y[:, 0] if one_d else y


def _pooling(original: Callable, kind: str) -> Callable:
    def pool(
        inputs: Any,
        pool_size: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        padding: str = "valid",
        data_format: str | None = None,
    ) -> Any:
        active = _ACTIVE.get()
        if "pool" not in active and not (kind == "max" and "maxpool" in active):
            return original(inputs, pool_size, strides, padding, data_format)
        from ablab._keras import keras_backend

        fmt = keras_backend.standardize_data_format(data_format)
        x = jnp.asarray(inputs)
        n = x.ndim - 2
        if n < 1:
            return original(inputs, pool_size, strides, padding, data_format)
        p = _tuple(pool_size, n)
        s = p if strides is None else _tuple(strides, n)
        xl = _channels_last(x, fmt)
        out = _tiles(xl, p, s, padding)
        if out is None or 0 in out:
            return original(inputs, pool_size, strides, padding, data_format)
        if kind == "max" and "maxpool" in active and _max_pool_fits(xl, p):
            y = _max_pool_kernel(xl, p)
        elif "pool" not in active:
            return original(inputs, pool_size, strides, padding, data_format)
        elif kind == "max":
            y = _max_pool_tiled(xl, p, out)
        else:
            y = jnp.mean(_windows(xl, p, out), axis=-1)
        return _channels_back(y, fmt)

    pool.__wrapped__ = original  # type: ignore[attr-defined]
    return pool


# -- BatchNormalization's per-channel sums over a wide minor axis ----------------------------

WIDE_SUM = 256
"""Floats in the minor axis of a per-channel sum's first stage (rows folded in until the
axis is this wide). Summing a ``(8 * 64 * 8 * 8, 8)`` array under ``vmap`` (2 cores):
65 us as it is, 35 / 27 / 24 / 72 us with a minor axis of 64 / 128 / 256 / 512 floats."""


def channel_sum(x: jax.Array) -> jax.Array:
    """The sums over every axis of ``x`` but the last, ``(C,)``: the rows folded into the
    minor axis first -- ``(rows / k, k * C)`` summed over rows, then the ``k`` partial sums
    -- ``k`` the largest power of two with ``k * C <= WIDE_SUM`` that divides the rows."""
    c = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    k = 1
    while 2 * k * c <= WIDE_SUM and rows % (2 * k) == 0:
        k *= 2
    x = x.reshape(rows // k, k * c)
    return jnp.sum(jnp.sum(x, axis=0).reshape(k, c), axis=0)


@jax.custom_jvp
def _channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = math.prod(x.shape[:-1])
    mean = channel_sum(x) / n
    return mean, channel_sum(jnp.square(x - mean)) / n


@_channel_moments.defjvp
def _channel_moments_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    # linear in the tangent: reverse mode transposes it to ((dm + 2 dv (x - mean)) / n,),
    # forward mode (jvp, Hessian-vector products) works as well
    (x,), (t,) = primals, tangents
    mean, var = _channel_moments(x)
    n = math.prod(x.shape[:-1])
    return (mean, var), (channel_sum(t) / n, 2.0 * channel_sum((x - mean) * t) / n)


def _batch_axes(axes: Any, ndim: int) -> set[int] | None:
    """``axes`` (an int, a sequence of ints, negatives allowed) as a set of axes of an
    ``ndim``-d array; None for anything else (None = all axes, out of range, repeated)."""
    try:
        listed = [operator.index(axes)] if np.ndim(axes) == 0 else [operator.index(i) for i in axes]
    except TypeError:
        return None
    if any(not -ndim <= i < ndim for i in listed):
        return None
    reduced = {i % ndim for i in listed}
    return reduced if len(reduced) == len(listed) else None


def _moments(original: Callable) -> Callable:
    def moments(x: Any, axes: Any, keepdims: bool = False, synchronized: bool = False) -> Any:
        if "norm" not in _ACTIVE.get() or synchronized:
            return original(x, axes, keepdims, synchronized=synchronized)
        a = jnp.asarray(x)
        # channels-last batch statistics (every axis reduced but the last), float32
        if (
            a.ndim < 2
            or a.dtype != jnp.float32
            or _batch_axes(axes, a.ndim) != set(range(a.ndim - 1))
        ):
            return original(x, axes, keepdims, synchronized=synchronized)
        mean, var = _channel_moments(a)
        if keepdims:
            shape = (1,) * (a.ndim - 1) + (a.shape[-1],)
            mean, var = mean.reshape(shape), var.reshape(shape)
        return mean, var

    moments.__wrapped__ = original  # type: ignore[attr-defined]
    return moments


# -- a bias's gradient as a per-channel sum over a wide minor axis ----------------------------


@jax.custom_vjp
def _bias_add(x: jax.Array, b: jax.Array) -> jax.Array:
    return x + b


def _bias_add_fwd(x: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    return x + b, b.shape


def _bias_add_bwd(shape: tuple[int, ...], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return g, channel_sum(g).reshape(shape)


_bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def _is_bias(x: jax.Array, b: jax.Array) -> bool:
    """Is ``x + b`` a bias added to channels-last feature maps: float32, ``x`` of rank >= 4
    (batch, 2-d or 3-d maps, channels), ``b`` one value per channel (shape ``(C,)`` or
    ``(1, .., 1, C)``)? A Dense layer's bias (rank 2) keeps Keras' add: there it ran slower
    (digits MLP 64-128-10 0.78x, the seed autoencoder + BN 0.90x)."""
    return (
        x.dtype == b.dtype == jnp.float32
        and x.ndim >= 4
        and 1 <= b.ndim <= x.ndim
        and b.shape[-1] == x.shape[-1]
        and b.size == x.shape[-1]
        and math.prod(x.shape[:-1]) > 1
    )


def _sparse(*xs: Any) -> bool:
    """Is any of ``xs`` a JAX sparse array (Keras' sparse-aware functions take those)?"""
    from jax.experimental import sparse

    return any(isinstance(x, sparse.JAXSparse) for x in xs)


def _add(original: Callable) -> Callable:
    def add(x1: Any, x2: Any) -> Any:
        if "bias" not in _ACTIVE.get() or not _LIBRARY_FUSIONS.get() or _sparse(x1, x2):
            return original(x1, x2)
        a, b = jnp.asarray(x1), jnp.asarray(x2)
        if not _is_bias(a, b):
            return original(x1, x2)
        return _bias_add(a, b)

    add.__wrapped__ = original  # type: ignore[attr-defined]
    return add


# -- a dense layer's kernel gradient in the layout that runs fast ------------------------------


SMALL_KERNEL = 16
"""A kernel with at most this many inputs and outputs has its forward product computed as
multiply + sum (:func:`_forward_product`)."""


def _forward_product(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x @ k``; for a small kernel (both sides <= :data:`SMALL_KERNEL`) as a broadcast
    multiply summed over the inputs, which XLA fuses into one loop. Under ``vmap`` with a
    shared input (a first layer) the matmul is one GEMM between two relayouts -- the kernels
    gathered into (in, seeds x out), the result back into (seeds, rows, out); the fused loop
    writes the per-seed layout directly. Seed autoencoder (12 -> 8 -> 12, 834 seeds a cell),
    interleaved A/B, median of 5-7 calls: plain 1.08x, 1.11x, 1.15x, + BN 1.05x. Not kept
    for the gradients: the input gradient the same way ran 0.66x, the kernel gradient 0.49x
    (their reductions run over the minor axis or across the rows)."""
    small = k.shape[0] <= SMALL_KERNEL and k.shape[1] <= SMALL_KERNEL
    # float32 only: in half precision each product would be rounded (and could overflow)
    # before the sum, where a matmul accumulates exact products; a contraction that does not
    # match is left to jnp.matmul, which refuses it (the broadcast would not)
    if small and x.dtype == k.dtype == jnp.float32 and x.shape[-1] == k.shape[0]:
        return jnp.sum(x[..., :, None] * k, axis=-2)
    return jnp.matmul(x, k)


@jax.custom_vjp
def _matmul_t(x: jax.Array, k: jax.Array) -> jax.Array:
    return _forward_product(x, k)


def _matmul_t_fwd(x: jax.Array, k: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _forward_product(x, k), (x, k)


def _matmul_t_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, k = res
    dx = jnp.matmul(g, k.T)
    dk = _kernel_grad(_rows(x), _rows(g))
    return dx, dk


def _rows(a: jax.Array) -> jax.Array:
    """``a`` as (rows, last axis)."""
    return a.reshape(-1, a.shape[-1])


def _kernel_grad(rows_x: jax.Array, rows_g: jax.Array) -> jax.Array:
    """``rows_x.T @ rows_g``: g transposed and materialized, so that the product is a plain
    (seeds-batched) matmul (out, rows) @ (rows, in); the result kept in that (out, in) layout,
    then transposed. Each barrier stops XLA folding its transpose back into the product,
    which would make it a product contracting the rows axis of both operands, run by XLA's
    own dot emitter several times slower under vmap."""
    g_t = jax.lax.optimization_barrier(rows_g.T)
    return jax.lax.optimization_barrier(jnp.matmul(g_t, rows_x)).T


_matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


# -- a small kernel's per-seed products on the compiled kernel -------------------------------


def _small_kernel(x: jax.Array, k: jax.Array) -> bool:
    """Would ``x @ k`` (k 2-d) use the small-products kernel: float32, a kernel of at most
    :data:`SMALL_KERNEL` inputs and outputs, a matching contraction, the kernel built here?"""
    return (
        x.dtype == k.dtype == jnp.float32
        and 1 <= k.shape[0] <= SMALL_KERNEL
        and 1 <= k.shape[1] <= SMALL_KERNEL
        and x.shape[-1] == k.shape[0]
        and _kernel_runs_here()
    )


def _per_seed(mode: int, fallback: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
    """``fallback(a, b)`` (2-d operands), whose ``vmap`` runs on the small-products kernel
    when ``b`` is per seed and ``a`` per seed or shared by every seed (a first layer's data:
    its forward product and kernel gradient; measured 1.05-1.1x over XLA's one large GEMM for
    the seed autoencoder's 32 x 12 x 8), where ``small_products.fits``; else it stays
    ``fallback`` vmapped."""

    @jax.custom_batching.custom_vmap
    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return fallback(a, b)

    @product.def_vmap
    def rule(
        axis_size: int, in_batched: Sequence[bool], a: jax.Array, b: jax.Array
    ) -> tuple[jax.Array, bool]:
        a_batched, b_batched = in_batched
        if b_batched and small_products.fits(mode, a, b):  # a per seed or shared
            return small_products.call(mode, a, b), True
        axes = (0 if a_batched else None, 0 if b_batched else None)
        return jax.vmap(fallback, in_axes=axes)(a, b), True

    return product


_forward_small = _per_seed(small_products.FORWARD, _forward_product)
_input_grad_small = _per_seed(small_products.INPUT_GRAD, lambda g, k: jnp.matmul(g, k.T))
_kernel_grad_small = _per_seed(small_products.KERNEL_GRAD, _kernel_grad)


@jax.custom_vjp
def _matmul_small(x: jax.Array, k: jax.Array) -> jax.Array:
    return _forward_small(_rows(x), k).reshape(*x.shape[:-1], k.shape[1])


def _matmul_small_fwd(x: jax.Array, k: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _matmul_small(x, k), (x, k)


def _matmul_small_bwd(
    res: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, k = res
    dx = _input_grad_small(_rows(g), k).reshape(x.shape)
    return dx, _kernel_grad_small(_rows(x), _rows(g))


_matmul_small.defvjp(_matmul_small_fwd, _matmul_small_bwd)


def _matmul(original: Callable) -> Callable:
    def matmul(x1: Any, x2: Any) -> Any:
        active = _ACTIVE.get()
        if ("dense" not in active and "small" not in active) or _sparse(x1, x2):
            return original(x1, x2)
        a, b = jnp.asarray(x1), jnp.asarray(x2)
        if (
            b.ndim != 2
            or b.size == 0
            or a.ndim < 2
            or a.dtype != b.dtype
            or not jnp.issubdtype(a.dtype, jnp.floating)
        ):
            return original(x1, x2)
        if "small" in active and _small_kernel(a, b):
            return _matmul_small(a, b)
        if "dense" not in active:
            return original(x1, x2)
        return _matmul_t(a, b)

    matmul.__wrapped__ = original  # type: ignore[attr-defined]
    return matmul


# -- Adam's update on the compiled kernel -----------------------------------------------------


def _adam_plain(c1: float, c2: float, eps: float) -> Callable:
    """Keras' Adam update of one variable (``Adam.update_step`` without amsgrad), its
    elementwise part in Keras' order of operations: ``(g, m, v, p, alpha) -> (m', v', p')``."""

    def update(g: Any, m: Any, v: Any, p: Any, alpha: Any) -> tuple[Any, Any, Any]:
        m2 = m + (g - m) * c1
        v2 = v + (g * g - v) * c2
        return m2, v2, p - (m2 * alpha) / (jnp.sqrt(v2) + eps)

    return update


def _adam_fused(c1: float, c2: float, eps: float) -> Callable:
    """:func:`_adam_plain`, whose ``vmap`` over seeds runs on the kernel's one-pass update
    (``small_products.adam``) when the variable and its slots are per seed; the rate may be
    shared (broadcast to every seed)."""
    plain = _adam_plain(c1, c2, eps)

    @jax.custom_batching.custom_vmap
    def update(g: Any, m: Any, v: Any, p: Any, alpha: Any) -> tuple[Any, Any, Any]:
        return plain(g, m, v, p, alpha)

    @update.def_vmap
    def rule(axis_size: int, in_batched: Sequence[bool], *args: Any) -> tuple[Any, Any]:
        g, m, v, p, alpha = args
        if all(in_batched[:4]):
            rate = alpha if in_batched[4] else jnp.broadcast_to(alpha, (axis_size,))
            if small_products.adam_fits(g, m, v, p, rate):
                return small_products.adam(g, m, v, p, rate, c1, c2, eps), (True, True, True)
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(plain, in_axes=axes)(*args), (True, True, True)

    return update


def _adam_update_step(original: Callable) -> Callable:
    """``keras.optimizers.Adam.update_step`` (Keras 3.15's, re-stated) with its elementwise
    update over the variable flattened, on the kernel under ``vmap`` (``adam``): one pass over
    the gradient, moments and weights per step instead of XLA's three loops per variable
    (the seed autoencoder 1.3x, issue 17). amsgrad, a non-float32 variable, or the lowering
    off: Keras' own."""

    def update_step(self: Any, gradient: Any, variable: Any, learning_rate: Any) -> Any:
        if (
            "adam" not in _ACTIVE.get()
            or self.amsgrad
            or variable.dtype != "float32"
            or not _kernel_runs_here()
        ):
            return original(self, gradient, variable, learning_rate)
        from keras import ops

        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        local_step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, variable.dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), local_step)
        m, v = adam_slots(self, variable)
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        update = _adam_fused(1 - self.beta_1, 1 - self.beta_2, self.epsilon)
        flat = [jnp.reshape(jnp.asarray(a), (-1,)) for a in (gradient, m.value, v.value)]
        m2, v2, p2 = update(*flat, jnp.reshape(jnp.asarray(variable.value), (-1,)), alpha)
        shape = tuple(variable.shape)
        self.assign(m, jnp.reshape(m2, shape))
        self.assign(v, jnp.reshape(v2, shape))
        self.assign(variable, jnp.reshape(p2, shape))

    update_step.__wrapped__ = original  # type: ignore[attr-defined]
    return update_step


_INSTALLED = False


def install() -> None:
    """Put the dispatching wrappers in Keras' JAX backend once per process. They call Keras'
    own function unless :func:`lowered` is active in the calling thread."""
    global _INSTALLED
    if _INSTALLED:
        return
    nn = keras_backend_nn()
    nn.conv = _conv(nn.conv)
    nn.max_pool = _pooling(nn.max_pool, "max")
    nn.average_pool = _pooling(nn.average_pool, "average")
    nn.moments = _moments(nn.moments)
    numpy = keras_backend_numpy()
    numpy.matmul = _matmul(numpy.matmul)
    numpy.add = _add(numpy.add)
    import keras

    keras.optimizers.Adam.update_step = _adam_update_step(keras.optimizers.Adam.update_step)
    _INSTALLED = True
