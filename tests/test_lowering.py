"""ablab.engine.lowering: convolution as im2col + matmul, pooling as reshape + reduce.

Expected values come from Keras' own JAX lowering (``lax.conv_general_dilated``,
``lax.reduce_window``), called through the same ``keras.src.backend.jax.nn`` functions
outside :func:`lowering.lowered`; the engine with the lowerings is held to ``model.fit``
(``ablab.engine.reference``) at tests/test_reference.py's tolerances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablab._keras import keras_backend_nn
from ablab.engine import lowering, small_products
from ablab.engine.xla import compiler_options
from ablab.errors import InputError
from tests.conftest import make_program
from tests.test_layers import _assert_fidelity, _study
from tests.test_small_products import require_kernel

nn = keras_backend_nn()
RNG = np.random.default_rng(0)


def _values_and_grads(
    fn: Any,
    args: tuple,
    argnums: tuple[int, ...],
    lowered: bool,
    names: frozenset[str] = lowering.ALL,
    library_fusions: bool = False,
) -> tuple:
    def loss(*a: Any) -> jax.Array:
        return jnp.sum(jnp.sin(fn(*a)))

    if lowered:
        with lowering.lowered(names, library_fusions=library_fusions):
            return fn(*args), jax.grad(loss, argnums)(*args)
    return fn(*args), jax.grad(loss, argnums)(*args)


def _primitives(fn: Any, *args: Any) -> set[str]:
    # a fresh function each time: JAX caches a trace by the function's identity, not by the
    # lowering in force (the engine traces a fresh function per program)
    return {str(e.primitive) for e in jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr.eqns}


CONVS = [  # input shape, kernel size, strides, padding, dilation, data format
    ((4, 8, 8, 3), (3, 3), 1, "same", 1, "channels_last"),
    ((4, 9, 7, 2), (3, 2), 2, "valid", 1, "channels_last"),
    ((2, 10, 10, 3), (3, 3), (2, 1), "same", 2, "channels_last"),
    ((2, 3, 9, 9), (3, 3), 1, "same", 1, "channels_first"),
    ((2, 12, 3), (5,), 3, "same", 1, "channels_last"),
    ((2, 5, 6, 7, 2), (2, 3, 2), 1, "valid", 1, "channels_last"),
]


@pytest.mark.parametrize(("shape", "ks", "strides", "padding", "dilation", "fmt"), CONVS)
def test_conv_as_im2col_matches_keras(
    shape: tuple, ks: tuple, strides: Any, padding: str, dilation: int, fmt: str
) -> None:
    x = jnp.asarray(RNG.normal(size=shape), jnp.float32)
    channels = shape[-1] if fmt == "channels_last" else shape[1]
    k = jnp.asarray(RNG.normal(size=(*ks, channels, 5)), jnp.float32)

    def conv(x: jax.Array, k: jax.Array) -> jax.Array:
        return nn.conv(x, k, strides, padding, fmt, dilation)

    want, want_grads = _values_and_grads(conv, (x, k), (0, 1), lowered=False)
    got, got_grads = _values_and_grads(conv, (x, k), (0, 1), lowered=True)
    assert got.shape == want.shape
    # float32 sums of up to 3*3*3 products (value) / ~600 (kernel gradient), another order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-5)
    with lowering.lowered(lowering.ALL):
        assert "conv_general_dilated" not in _primitives(conv, x, k)
    assert "conv_general_dilated" in _primitives(conv, x, k)  # outside: Keras' own


POOLS = [  # input shape, pool size, strides, padding, data format
    ((4, 8, 8, 3), 2, 2, "valid", "channels_last"),
    ((4, 9, 7, 3), 2, 2, "valid", "channels_last"),  # cropped like `valid`
    ((4, 8, 8, 3), (2, 4), (2, 4), "same", "channels_last"),
    ((2, 3, 8, 8), 2, 2, "valid", "channels_first"),
    ((2, 9, 3), 3, 3, "valid", "channels_last"),
    ((3, 9, 7, 11), 2, 2, "valid", "channels_last"),  # cropped; the kernel's 8-channel vector + 3
]


@pytest.mark.parametrize(("shape", "pool", "strides", "padding", "fmt"), POOLS)
@pytest.mark.parametrize(
    ("kind", "names"),
    [("max_pool", {"pool"}), ("max_pool", {"maxpool"}), ("average_pool", {"pool"})],
)
def test_pooling_as_reshape_or_on_the_kernel_matches_keras(
    kind: str, names: set[str], shape: tuple, pool: Any, strides: Any, padding: str, fmt: str
) -> None:
    """``pool``: reshape + reduce; ``maxpool``: max pooling on the compiled kernel (the first
    maximum's offset kept for the gradient). Both against Keras' ``reduce_window``."""
    if "maxpool" in names:
        require_kernel()
    x = RNG.normal(size=shape).astype(np.float32)
    x[0, :4] = 1.0  # ties inside windows: the max's gradient goes to the first, as XLA's
    x[1] = 0.0  # all-equal windows (ReLU's zeros)
    f = getattr(nn, kind)

    def pooled(x: jax.Array) -> jax.Array:
        return f(x, pool, strides, padding, fmt)

    xj = jnp.asarray(x)
    want, (want_grad,) = _values_and_grads(pooled, (xj,), (0,), lowered=False)
    got, (got_grad,) = _values_and_grads(pooled, (xj,), (0,), True, frozenset(names))
    if kind == "max_pool":  # a selection: bit-identical values and gradient
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_grad, want_grad)
    else:  # a mean of pool-size values summed in another order
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    with lowering.lowered(frozenset(names)):
        assert not any("reduce_window" in p for p in _primitives(pooled, xj))
        text = jax.jit(jax.grad(lambda x: jnp.sum(pooled(x)))).lower(xj).as_text()
    on_kernel = "maxpool" in names
    assert (f"@{small_products.MAX_POOL_TARGET}" in text) == on_kernel
    assert (f"@{small_products.MAX_POOL_GRAD_TARGET}" in text) == on_kernel


def test_max_pool_on_the_kernel_under_vmap_with_nan() -> None:
    """Over seeds (``vmap``) as the engine calls it: Keras' values and gradients, a window
    with a NaN included (NaN out; Keras sends its gradient to the first element too)."""
    require_kernel()
    x = RNG.normal(size=(3, 4, 6, 6, 8)).astype(np.float32)
    x[1, 0, 2, 3, 5] = np.nan

    def pooled(x: jax.Array) -> jax.Array:
        return jax.vmap(lambda a: nn.max_pool(a, 2, 2, "valid", "channels_last"))(x)

    want, (want_grad,) = _values_and_grads(pooled, (jnp.asarray(x),), (0,), lowered=False)
    got, (got_grad,) = _values_and_grads(pooled, (jnp.asarray(x),), (0,), True, {"maxpool"})
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_grad, want_grad)
    assert np.isnan(np.asarray(got)).sum() == 1


def test_max_pool_on_the_kernel_keeps_xlas_bits_and_a_shared_input() -> None:
    """Bit patterns, not just values: reduce_window's max gives +0 over -0 in either order and
    keeps the first NaN's payload; the kernel's do too. A pool of an input every seed shares,
    followed by per-seed weights (its gradient: a shared offset, per-seed gradients)."""
    require_kernel()
    x = np.zeros((1, 2, 8, 9), np.float32)
    x[0, 0, 0], x[0, 1, 0] = -0.0, 0.0  # window (0, 0): -0 then +0
    x[0, 0, 3], x[0, 1, 2] = 0.0, -0.0  # window (0, 1): +0 then -0
    nans = np.array([0x7FC00001, 0x7FC00002], np.uint32).view(np.float32)
    x[0, 0, 4], x[0, 1, 5] = nans  # window (0, 2): two NaNs, the first one's payload
    x[0, 0, 6:8, 8] = -0.0  # the scalar tail (channel 8): -0 and -0 stays -0

    def pool(a: Any) -> jax.Array:
        return nn.max_pool(a, 2, 2, "valid", "channels_last")

    want = np.asarray(jax.jit(pool)(x))
    with lowering.lowered(frozenset({"maxpool"})):
        got = np.asarray(jax.jit(lambda a: pool(a))(x))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got.view(np.uint32)[0, 0, 0, 0] == 0 and got.view(np.uint32)[0, 0, 1, 0] == 0
    assert got.view(np.uint32)[0, 0, 2, 0] == 0x7FC00001

    shared = jnp.asarray(RNG.normal(size=(2, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)  # 3 seeds' per-channel weights

    def with_input(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.vmap(lambda w: jnp.sum(jnp.sin(pool(x) * w)), in_axes=0)(w)

    want_grads = jax.grad(lambda x, w: jnp.sum(with_input(x, w)), (0, 1))(shared, w)
    with lowering.lowered(frozenset({"maxpool"})):
        grad_fn = jax.jit(jax.grad(lambda x, w: jnp.sum(with_input(x, w)), (0, 1)))
        got_grads = grad_fn(shared, w)
        text = grad_fn.lower(shared, w).as_text()
    assert f"@{small_products.MAX_POOL_GRAD_TARGET}" in text
    for g, wg in zip(got_grads, want_grads, strict=True):  # the seeds' sums, another order
        np.testing.assert_allclose(g, wg, rtol=1e-6, atol=1e-6)


CONVS_ON_KERNEL = [  # input shape (per seed), kernel size, strides, padding, dilation
    ((4, 8, 8, 1), (3, 3), 1, "same", 1),  # the digits CNN: 9 x 8, rows of 4 x 64
    ((3, 9, 7, 2), (2, 3), 2, "valid", 1),  # 12 inputs
    ((2, 12, 3), (5,), 1, "same", 2),  # 1-d, 15 inputs
]


@pytest.mark.parametrize(("shape", "ks", "strides", "padding", "dilation"), CONVS_ON_KERNEL)
@pytest.mark.parametrize("shared", [True, False])
def test_small_convolutions_product_runs_on_the_kernel(
    shape: tuple, ks: tuple, strides: Any, padding: str, dilation: int, shared: bool
) -> None:
    """``conv`` + ``small``: a convolution whose im2col product is small (at most 16 window
    elements x channels, 16 filters) computes it per seed on the compiled kernel: with the
    input shared by every seed (a first layer: the forward product and the kernel gradient)
    or per seed (the input gradient too). Values and gradients are Keras' convolution's
    (float32 sums in another order)."""
    require_kernel()
    seeds = 3
    k = jnp.asarray(RNG.normal(size=(seeds, *ks, shape[-1], 8)), jnp.float32)
    x = jnp.asarray(RNG.normal(size=shape if shared else (seeds, *shape)), jnp.float32)

    def conv(x: jax.Array, k: jax.Array) -> jax.Array:
        one = lambda x, k: nn.conv(x, k, strides, padding, "channels_last", dilation)  # noqa: E731
        return jax.vmap(one, in_axes=(None if shared else 0, 0))(x, k)

    argnums = (1,) if shared else (0, 1)
    want, want_grads = _values_and_grads(conv, (x, k), argnums, lowered=False)
    names = frozenset({"conv", "small"})
    got, got_grads = _values_and_grads(conv, (x, k), argnums, True, names)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-5)
    with lowering.lowered(names):
        loss = lambda x, k: jnp.sum(jnp.sin(conv(x, k)))  # noqa: E731
        text = jax.jit(jax.grad(loss, argnums)).lower(x, k).as_text()
    assert text.count(f"@{small_products.TARGET}") == (2 if shared else 3)
    assert "convolution" not in text


def test_a_convolution_too_wide_for_the_kernel_keeps_the_gemm() -> None:
    """3 x 3 windows of 2 channels are 18 inputs (more than 16): the im2col GEMM."""
    require_kernel()
    x = jnp.asarray(RNG.normal(size=(4, 8, 8, 2)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(3, 3, 3, 2, 8)), jnp.float32)
    conv = jax.vmap(lambda k: nn.conv(x, k, 1, "same", "channels_last", 1))
    with lowering.lowered(frozenset({"conv", "small"})):
        text = jax.jit(conv).lower(k).as_text()
        got = jax.jit(conv)(k)
    assert small_products.TARGET not in text and "convolution" not in text
    np.testing.assert_allclose(got, conv(k), rtol=1e-5, atol=2e-6)


def test_a_feature_maps_bias_gradient_is_a_wide_channel_sum() -> None:
    """``bias``: ``x + b`` with one bias per channel of rank >= 4 feature maps (a Conv2D's)
    has its bias gradient summed over a wide minor axis (``channel_sum``) in a program
    compiled with YNNPACK's fusions; the values and gradients are Keras' add's (the sum in
    another order). A Dense layer's bias (rank 2), and any bias in a program without those
    fusions, keeps Keras' add."""
    from ablab._keras import keras_backend_numpy

    add = keras_backend_numpy().add
    x = jnp.asarray(RNG.normal(size=(3, 64, 8, 8, 8)), jnp.float32)
    b = jnp.asarray(RNG.normal(size=(3, 1, 1, 1, 8)), jnp.float32)
    biased = jax.vmap(add)
    want, want_grads = _values_and_grads(biased, (x, b), (0, 1), lowered=False)
    bias = {"names": frozenset({"bias"}), "library_fusions": True}
    got, got_grads = _values_and_grads(biased, (x, b), (0, 1), lowered=True, **bias)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_grads[0], want_grads[0])
    np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=1e-5, atol=1e-4)  # 4,096 terms
    flat_b = b.reshape(3, 8)  # a bias of shape (C,), as a Dense layer's or any add's
    want_flat = _values_and_grads(biased, (x, flat_b), (0, 1), lowered=False)
    got_flat = _values_and_grads(biased, (x, flat_b), (0, 1), lowered=True, **bias)
    for g, w in zip(jax.tree.leaves(got_flat), jax.tree.leaves(want_flat), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    with lowering.lowered(frozenset({"bias"})):  # a program without YNNPACK's fusions
        assert "custom_vjp_call" not in _primitives(biased, x, b)
    with lowering.lowered(frozenset({"bias"}), library_fusions=True):
        assert "custom_vjp_call" in _primitives(biased, x, b)
        assert "custom_vjp_call" in _primitives(biased, x, flat_b)
        dense = _primitives(jax.vmap(add), x[:, 0, 0], b[:, 0, 0, 0])  # (seeds, rows, 8) + (8,)
        assert "custom_vjp_call" not in dense
        other = _primitives(jax.vmap(add), x, x)  # not a bias
        assert "custom_vjp_call" not in other
        reversed_order = _primitives(jax.vmap(add), b, x)  # the bias first: Keras' add
        assert "custom_vjp_call" not in reversed_order


def test_what_does_not_tile_or_groups_keeps_keras_lowering() -> None:
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    grouped = jnp.ones((3, 3, 2, 6), jnp.float32)  # 2 groups of 2 input channels
    with lowering.lowered(lowering.ALL):
        conv = _primitives(lambda x: nn.conv(x, grouped, 1, "same", None, 1), x)
        overlapping = _primitives(lambda x: nn.max_pool(x, 3, 1, "valid", None), x)
        odd_same = _primitives(lambda x: nn.max_pool(x, 3, 3, "same", None), x)  # 8 % 3
        only_pool = lowering.lowered(frozenset({"pool"}))
        with only_pool:
            conv_off = _primitives(
                lambda x: nn.conv(x, grouped[:, :, :, :2], 1, "same"), x[..., :2]
            )
    assert "conv_general_dilated" in conv
    assert any("reduce_window" in p for p in overlapping)
    assert any("reduce_window" in p for p in odd_same)
    assert "conv_general_dilated" in conv_off


def test_env_selects_lowerings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(small_products, "available", lambda: True)  # (a C++ compiler here)
    cases = [("", lowering.DEFAULT), ("1", lowering.DEFAULT), ("all", lowering.ALL),
             ("0", frozenset()), ("off", frozenset()), ("pool", {"pool"}),
             ("conv, pool", {"conv", "pool"}), ("dense", {"dense"}),
             ("norm", {"norm"}), ("dense,small", {"dense", "small"}),
             ("maxpool,bias", {"maxpool", "bias"})]  # fmt: skip
    for value, want in cases:
        monkeypatch.setenv(lowering.ENV, value)
        assert lowering.enabled() == want, value
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(lowering.ENV, "")
    assert lowering.enabled() == frozenset()  # an accelerator keeps Keras' own lowering...
    monkeypatch.setenv(lowering.ENV, "1")
    # ... unless asked; but the small-products kernel is a CPU custom call
    assert lowering.enabled() == lowering.DEFAULT - lowering.NEEDS_KERNEL
    monkeypatch.setenv(lowering.ENV, "dense,small")
    with pytest.raises(InputError, match="runs on a CPU backend only, not 'gpu'"):
        lowering.enabled()
    monkeypatch.setenv(lowering.ENV, "conv,im2col")
    with pytest.raises(InputError, match=r"unknown lowering\(s\) \['im2col'\]"):
        lowering.enabled()


def test_without_its_kernel_small_is_left_out_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler: the default and ``all`` leave ``small`` out (XLA's products, the same
    values); naming it is an error that says why and how to fix it."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(small_products, "available", lambda: False)
    monkeypatch.setattr(small_products, "unavailable_reason", lambda: "BuildError: no compiler")
    for value in ("", "1", "all"):
        monkeypatch.setenv(lowering.ENV, value)
        assert lowering.enabled() == lowering.ALL - lowering.NEEDS_KERNEL, value
    monkeypatch.setenv(lowering.ENV, "dense,small")
    with pytest.raises(InputError, match="BuildError: no compiler") as err:
        lowering.enabled()
    assert "install a C++ compiler" in str(err.value)
    # asked for inside the engine's tracing anyway: the product keeps XLA's form
    from ablab._keras import keras_backend_numpy

    h = jnp.asarray(RNG.normal(size=(3, 4, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(3, 8, 12)), jnp.float32)
    with lowering.lowered(frozenset({"dense", "small"})):
        text = jax.jit(jax.vmap(lambda a, b: keras_backend_numpy().matmul(a, b))).lower(h, k)
    assert small_products.TARGET not in text.as_text()


MOMENTS = [  # input shape, axes (BatchNormalization's: every axis but the channels)
    ((64, 8, 8, 8), (0, 1, 2)),  # the digits CNN's conv output: rows folded 32 at a time
    ((29, 8, 8, 8), [0, 1, 2]),  # an epoch's last, short batch: 1,856 rows, folded 32
    ((64, 128), (0,)),  # Dense(128): 2 at a time (2 * 128 = WIDE_SUM)
    ((33, 5), (0,)),  # 33 rows: no power of two divides them, summed as they are
    ((6, 4, 300), (-3, -2)),  # wider than WIDE_SUM
]


@pytest.mark.parametrize(("shape", "axes"), MOMENTS)
@pytest.mark.parametrize("keepdims", [False, True])
def test_batch_moments_over_a_wide_minor_axis_match_keras(
    shape: tuple, axes: Any, keepdims: bool
) -> None:
    x = jnp.asarray(RNG.normal(loc=0.5, size=shape), jnp.float32)
    weights = jnp.asarray(RNG.normal(size=(2, shape[-1])), jnp.float32)

    def moments(x: jax.Array) -> jax.Array:  # both statistics, in one output to differentiate
        mean, var = nn.moments(x, axes, keepdims)
        return jnp.stack([mean.reshape(-1) * weights[0], var.reshape(-1) * weights[1]])

    want, (want_grad,) = _values_and_grads(moments, (x,), (0,), lowered=False)
    got, (got_grad,) = _values_and_grads(moments, (x,), (0,), lowered=True)
    mean, var = nn.moments(x, axes, keepdims)
    with lowering.lowered(lowering.ALL):
        got_mean, got_var = nn.moments(x, axes, keepdims)
        assert "custom_jvp_call" in _primitives(moments, x)
    assert got_mean.shape == mean.shape and got_var.shape == var.shape
    # float32 means of up to 4,096 rows summed in another order; the gradient without
    # autodiff's term for the mean's share of the variance (a sum of deviations: ~0)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_moments_that_are_not_batch_statistics_keep_keras_lowering() -> None:
    x = jnp.ones((4, 6, 8), jnp.float32)
    with lowering.lowered(lowering.ALL):
        layer_norm = _primitives(lambda x: nn.moments(x, [-1], True), x)  # over the channels
        first = _primitives(lambda x: nn.moments(x, (0, 2), False), x)  # channels first
        some = _primitives(lambda x: nn.moments(x, (1,), False), x)
        # axes Keras takes that are not batch statistics: everything (None), the statistics
        # of a 1-d array; repeated axes are Keras' error, as without the lowering
        odd = [
            _primitives(lambda x: nn.moments(x, None, False), x),
            _primitives(lambda x: nn.moments(x[0, 0], 0, False), x),
        ]
        with pytest.raises(ValueError, match="duplicate value"):
            nn.moments(x, (0, 0, 1), False)
        numpy_axes = _primitives(lambda x: nn.moments(x, np.array([0, -2]), False), x)
        assert "custom_jvp_call" in numpy_axes  # numpy integers are axes too
    with lowering.lowered(frozenset({"conv", "pool"})):
        off = _primitives(lambda x: nn.moments(x, (0, 1), False), x)
    for primitives in (layer_norm, first, some, off, *odd):
        assert "custom_jvp_call" not in primitives


@pytest.mark.parametrize("x_shape", [(6, 40), (3, 6, 40)])
def test_dense_kernel_gradient_transposed_matches_keras(x_shape: tuple) -> None:
    from ablab._keras import keras_backend_numpy

    matmul = keras_backend_numpy().matmul
    x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(40, 32)), jnp.float32)
    seeds_k = jnp.asarray(RNG.normal(size=(3, 40, 32)), jnp.float32)

    def per_seed(x: jax.Array, k: jax.Array) -> jax.Array:  # a shared input, per-seed kernels
        return jax.vmap(lambda kk: matmul(x, kk))(k)

    for fn, args in [(matmul, (x, k)), (per_seed, (x, seeds_k))]:
        want, want_grads = _values_and_grads(fn, args, (0, 1), lowered=False)
        got, got_grads = _values_and_grads(fn, args, (0, 1), lowered=True)
        # float32 sums of 40 products (value) / 6-18 (kernel gradient), another order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    small = k[:3, :4]  # a kernel of any size goes through it; integers, a 1-d second
    # operand and an empty kernel keep Keras' product
    with lowering.lowered(frozenset({"dense"})):
        assert "custom_vjp_call" in _primitives(matmul, x, k)
        assert "custom_vjp_call" in _primitives(matmul, x[..., :3], small)
        assert "custom_vjp_call" in _primitives(
            matmul, x.astype(jnp.float16), k.astype(jnp.float16)
        )
        for a, b in [
            (x.astype(jnp.int32), k.astype(jnp.int32)),
            (x, k[:, 0]),
            (x[..., :0], k[:0]),
        ]:
            assert "custom_vjp_call" not in _primitives(matmul, a, b)
        # an empty kernel's gradient (Keras' own product): no reshape of 0 columns
        empty = jax.grad(lambda k: jnp.sum(matmul(x[..., :0], k)))(k[:0])
        assert empty.shape == (0, 32)


def test_dense_lowering_gradients_for_one_operand_higher_orders_and_half_precision() -> None:
    """The custom VJP's gradients w.r.t. either operand alone, reverse over reverse, and in
    float16, against Keras' own product; forward mode is what a custom VJP cannot do (the
    engine uses none: this pins the limitation)."""
    from ablab._keras import keras_backend_numpy

    matmul = keras_backend_numpy().matmul
    x = jnp.asarray(RNG.normal(size=(2, 3, 6, 5)), jnp.float32)  # a 4-d input
    k = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)

    def f(x: jax.Array, k: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(matmul(x, k)))

    def grads(argnums: int) -> tuple[jax.Array, jax.Array]:  # traced afresh on each call
        def squared(x: jax.Array, k: jax.Array) -> jax.Array:
            return jnp.sum(jax.grad(f, argnums)(x, k) ** 2)

        return jax.grad(f, argnums)(x, k), jax.grad(squared, 1)(x, k)

    for argnums in (0, 1):
        want, second_want = grads(argnums)
        with lowering.lowered(frozenset({"dense"})):
            got, second = grads(argnums)
        # float32 sums of 5 (input gradient) / 36 (kernel gradient) products, another order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(second, second_want, rtol=1e-4, atol=1e-4)
    half = (x.astype(jnp.float16), k.astype(jnp.float16))
    want_half = jax.grad(lambda x, k: f(x, k).astype(jnp.float32), (0, 1))(*half)
    with lowering.lowered(frozenset({"dense"})):
        got_half = jax.grad(lambda x, k: f(x, k).astype(jnp.float32), (0, 1))(*half)
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(lambda k: matmul(x, k), (k,), (jnp.ones_like(k),))
    for g, w in zip(got_half, want_half, strict=True):
        assert g.dtype == w.dtype == jnp.float16
        # float16 sums of 5 / 36 products in another order: a few float16 ulps
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=1e-2, atol=1e-2)


def _dots_contracting_rows_of_both(fn: Any, *args: Any) -> list[str]:
    """The dots in ``fn``'s optimized CPU program that contract axis 1 of both of two
    seed-batched operands: the ``(seeds, rows, in) x (seeds, rows, out)`` form."""
    with jax.default_device(jax.devices("cpu")[0]):  # compiled as the engine compiles
        hlo = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options()).as_text()
    dims = ["lhs_batch_dims={0}", "lhs_contracting_dims={1}", "rhs_batch_dims={0}"]
    bad = ", ".join([*dims, "rhs_contracting_dims={1}"])
    return [line.strip() for line in hlo.splitlines() if " dot(" in line and bad in line]


def test_dense_per_seed_kernel_gradient_is_a_plain_batched_product() -> None:
    """Under ``vmap`` Keras' kernel gradient ``x.T @ g`` contracts the rows axis of both
    operands, which XLA's CPU backend runs on its own slow dot emitter (~5 GFLOP/s, the seed
    autoencoder's 12 x 8 kernels; issue 17). Lowered, it is ``(out, rows) @ (rows, in)``
    per seed, with the same values."""
    from ablab._keras import keras_backend_numpy

    matmul = keras_backend_numpy().matmul
    # the seed autoencoder's second layer: 6 seeds, batches of 32 rows, 8 -> 12
    h = jnp.asarray(RNG.normal(size=(6, 32, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(6, 8, 12)), jnp.float32)
    y = jnp.asarray(RNG.normal(size=(6, 32, 12)), jnp.float32)

    def kernel_grads(h: jax.Array, k: jax.Array, y: jax.Array) -> jax.Array:
        loss = lambda h, k, y: jnp.mean((matmul(h, k) - y) ** 2)  # noqa: E731
        return jax.vmap(jax.grad(loss, argnums=1))(h, k, y)

    want = kernel_grads(h, k, y)
    assert _dots_contracting_rows_of_both(lambda *a: kernel_grads(*a), h, k, y)  # Keras' own
    with lowering.lowered(frozenset({"dense"})):
        got = kernel_grads(h, k, y)
        assert not _dots_contracting_rows_of_both(lambda *a: kernel_grads(*a), h, k, y)
    # float32 sums of 32 products in another order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_small_kernels_forward_product_is_one_fused_loop() -> None:
    """A kernel of at most 16 x 16 (the seed autoencoder's 12 x 8 and 8 x 12): its forward
    product under ``vmap`` -- a shared input (first layer) or per-seed inputs -- is a multiply
    + sum, no dot; one input more keeps the dot. Same values as Keras' product."""
    from ablab._keras import keras_backend_numpy

    matmul = keras_backend_numpy().matmul
    x = jnp.asarray(RNG.normal(size=(32, 17)), jnp.float32)
    h = jnp.asarray(RNG.normal(size=(6, 32, 16)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(6, 17, 16)), jnp.float32)

    def shared(x: jax.Array, k: jax.Array) -> jax.Array:
        return jax.vmap(lambda kk: matmul(x, kk))(k)

    def per_seed(h: jax.Array, k: jax.Array) -> jax.Array:
        return jax.vmap(matmul)(h, k)

    def dots(fn: Any, *args: Any) -> int:
        hlo = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options()).as_text()
        return sum(" dot(" in line for line in hlo.splitlines())

    cases = [
        (shared, (x[:, :12], k[:, :12, :8]), 0),  # the autoencoder's first layer
        (per_seed, (h[..., :8], k[:, :8, :12]), 0),  # its second
        (per_seed, (h, k[:, :16, :16]), 0),
        (shared, (x, k), 1),  # 17 inputs: a dot
        (per_seed, (h[..., :8], jnp.concatenate([k[:, :8], k[:, :8, :1]], axis=2)), 1),
    ]
    half = (h[..., :8].astype(jnp.float16), k[:, :8, :12].astype(jnp.float16))
    cases.append((per_seed, half, 1))  # half precision: a matmul (it accumulates exactly)
    for fn, args, n_dots in cases:
        want = fn(*args)
        with lowering.lowered(frozenset({"dense"})):
            got = fn(*args)
            assert dots(fn, *args) == n_dots
        # float32 sums of at most 17 products, in another order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with lowering.lowered(frozenset({"dense"})), pytest.raises(TypeError):
        matmul(x[:, :1], k[0, :5, :3])  # a contraction that does not match is refused


def test_small_kernels_per_seed_products_run_on_the_kernel() -> None:
    """``small``: a small float32 kernel's three products under ``vmap`` -- forward, input
    gradient, kernel gradient -- are custom calls to the kernel; with the input shared by
    every seed (a first layer's data, which needs no gradient) its forward product and kernel
    gradient. The values and gradients are Keras' own matmul's (float32 sums in another
    order)."""
    require_kernel()
    from ablab._keras import keras_backend_numpy

    matmul = keras_backend_numpy().matmul
    h = jnp.asarray(RNG.normal(size=(6, 32, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(6, 8, 12)), jnp.float32)
    y = jnp.asarray(RNG.normal(size=(6, 32, 12)), jnp.float32)

    def per_seed(h: jax.Array, k: jax.Array, y: jax.Array) -> tuple:
        loss = lambda h, k, y: jnp.mean((matmul(h, k) - y) ** 2)  # noqa: E731
        return jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)))(h, k, y)

    def shared(h: jax.Array, k: jax.Array, y: jax.Array) -> tuple:
        loss = lambda k, y: jnp.mean((matmul(h[0], k) - y) ** 2)  # noqa: E731
        return jax.vmap(jax.value_and_grad(loss))(k, y)

    def calls(fn: Any) -> int:
        text = jax.jit(lambda *a: fn(*a)).lower(h, k, y).as_text()
        return text.count(f"@{small_products.TARGET}")

    for fn, n_calls in ((per_seed, 3), (shared, 2)):
        want = fn(h, k, y)
        assert calls(fn) == 0  # Keras' own
        with lowering.lowered(frozenset({"dense", "small"})):
            got = fn(h, k, y)
            assert calls(fn) == n_calls, fn.__name__
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # a vmap around the seeds' vmap (the engine has none): the kernel once per outer element
    nested = jax.vmap(jax.vmap(lambda a, b: matmul(a, b)))
    outer = (h.reshape(2, 3, 32, 8), k.reshape(2, 3, 8, 12))
    want_nested = nested(*outer)
    with lowering.lowered(frozenset({"dense", "small"})):
        got_nested = jax.jit(lambda a, b: nested(a, b))(*outer)
    np.testing.assert_allclose(got_nested, want_nested, rtol=1e-5, atol=1e-6)
    # half precision, a wide kernel: XLA's products
    for args in ((h.astype(jnp.float16), k.astype(jnp.float16)), (h, jnp.ones((6, 8, 17)))):
        with lowering.lowered(frozenset({"dense", "small"})):
            text = jax.jit(jax.vmap(lambda a, b: matmul(a, b))).lower(*args).as_text()
        assert small_products.TARGET not in text


def test_the_seed_studys_programs_run_their_products_on_the_small_kernel(
    seed_study: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_reference.py holds the seed study's ``plain`` and ``bn`` to ``model.fit``
    (BatchNormalization's validation values at 1e-4) with the default lowerings: where the
    kernel builds, that is the small-products kernel's fidelity test -- its programs call it
    (the second layer's three products, the first layer's two with the shared data)."""
    require_kernel()
    monkeypatch.setenv(lowering.ENV, "")  # the default lowerings
    for variant in ("plain", "bn"):
        text = make_program(seed_study, variant).lower("train", 2).as_text()
        assert text.count(f"@{small_products.TARGET}") >= 5, variant
        assert f"@{small_products.ADAM_TARGET}" in text, variant  # and Adam's update (below)


def _adam_steps(amsgrad: bool = False) -> tuple:
    """Keras' Adam (``stateless_apply``) over 5 seeds' (12, 8) and (8,) weights, 3 steps,
    vmapped over seeds: ``(function, arguments)``."""
    import keras

    shapes = [(12, 8), (8,)]
    optimizer = keras.optimizers.Adam(learning_rate=0.01, amsgrad=amsgrad)
    optimizer.build([keras.Variable(np.zeros(s, np.float32)) for s in shapes])
    ov0 = [np.asarray(v.value) for v in optimizer.variables]
    tv = [jnp.asarray(RNG.normal(size=(5, *s)), jnp.float32) for s in shapes]
    grads = [jnp.asarray(RNG.normal(size=(3, 5, *s)), jnp.float32) for s in shapes]

    def one_seed(tv: list, grads: list) -> list:
        ov = [jnp.asarray(v) for v in ov0]
        for step in range(3):
            tv, ov = optimizer.stateless_apply(ov, [g[step] for g in grads], tv)
        return [*tv, *ov]

    return jax.vmap(one_seed, in_axes=(0, 1)), (tv, grads)


def test_adams_update_runs_on_the_kernel_with_keras_values() -> None:
    """``adam``: Keras' ``Adam.update_step`` under ``vmap`` over seeds updates each variable
    and its moments in one custom call; the weights and slots after 3 steps are Keras' own
    (float32 rounding: the kernel may fuse a multiply-add). amsgrad keeps Keras' update."""
    require_kernel()
    for amsgrad, calls in ((False, 2), (True, 0)):  # (at least) one per variable
        fn, args = _adam_steps(amsgrad)
        want = fn(*args)
        with lowering.lowered(frozenset({"adam"})):
            text = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args).as_text()
            got = jax.jit(lambda *a, fn=fn: fn(*a))(*args)
        assert min(text.count(f"@{small_products.ADAM_TARGET}"), 2) == calls, amsgrad
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)
    fn, args = _adam_steps()
    text = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()  # the lowering off: Keras' own
    assert small_products.ADAM_TARGET not in text


CNN_BN = [
    {"layer": "Reshape", "target_shape": [8, 8, 1]},
    {"layer": "Conv2D", "filters": 4, "kernel_size": 3, "padding": "same"},
    {"layer": "BatchNormalization"},
    {"layer": "Activation", "activation": "relu"},
    {"layer": "MaxPooling2D", "pool_size": 2},
    {"layer": "Flatten"},
    {"layer": "Dense", "units": 10},
]


def _cnn_study(tmp_path: Path) -> Any:
    # 96 synthetic 8x8 "images", reconstructed (target = input): small, and every op of the
    # digits CNN (conv, BN, relu, max-pool, dense) with its gradient
    layers = [*CNN_BN[:-1], {"layer": "Dense", "units": 64}]
    data = {"synthetic": {"kind": "normal", "shape": [96, 64], "seed": 2}}
    return _study(tmp_path, data, {"layers": layers}, batch_size=32, epochs=2, shuffle=False)


def test_engine_traces_with_the_lowerings_and_fit_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's compiled program has no convolution and no windowed reduction, sums
    BatchNormalization's statistics folded (32 x 8 x 8 rows of 4 channels as 32 x 256), and
    still reproduces ``model.fit`` (BatchNormalization's validation values at 1e-4)."""
    monkeypatch.setenv(lowering.ENV, "1")  # the default lowerings, on any backend
    study = _cnn_study(tmp_path)
    engine = _assert_fidelity(study, bn=True)
    text = make_program(study, "v").lower("train", 1).as_text()  # before XLA's passes
    assert "convolution" not in text and "reduce_window" not in text
    assert "32x256xf32>" in text
    assert np.isfinite(engine["val_loss"]).all()
    if small_products.available():  # the convolution's product and the max pool on the kernel
        assert f"@{small_products.TARGET}" in text
        assert f"@{small_products.MAX_POOL_TARGET}" in text


def test_the_digits_cnn_on_the_kernels_agrees_with_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/digits_cnn.toml's ``none`` layers (Conv2D 8 filters 3 x 3 with relu, max
    pool, Dense) on synthetic 8 x 8 images, the default lowerings: the convolution's products
    and the max pool run on the compiled kernel, the bias keeps Keras' add (no BN on feature
    maps: no YNNPACK fusions, where the wide channel sum ran slower), and the history is
    ``model.fit``'s at tests/test_reference.py's tolerance (1e-5)."""
    require_kernel()
    monkeypatch.setenv(lowering.ENV, "")
    layers = [
        {"layer": "Reshape", "target_shape": [8, 8, 1]},
        {"layer": "Conv2D", "filters": 8, "kernel_size": 3, "padding": "same",
         "activation": "relu"},
        {"layer": "MaxPooling2D", "pool_size": 2},
        {"layer": "Flatten"},
        {"layer": "Dense", "units": 64},
    ]  # fmt: skip
    data = {"synthetic": {"kind": "normal", "shape": [96, 64], "seed": 3}}
    study = _study(tmp_path, data, {"layers": layers}, batch_size=32, epochs=2, shuffle=False)
    _assert_fidelity(study)
    text = make_program(study, "v").lower("train", 2).as_text()
    assert text.count(f"@{small_products.TARGET}") >= 2  # forward product, kernel gradient
    assert f"@{small_products.MAX_POOL_TARGET}" in text
    assert f"@{small_products.MAX_POOL_GRAD_TARGET}" in text
    # no BN on feature maps: the bias keeps Keras' add, the program is the one without `bias`
    monkeypatch.setenv(lowering.ENV, ",".join(sorted(lowering.enabled() - {"bias"})))
    assert make_program(study, "v").lower("train", 2).as_text() == text


def test_the_bias_lowering_follows_the_programs_library_fusions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bias`` alone (BN's moments not lowered): a conv + BN program (compiled with YNNPACK's
    fusions) sums its bias gradient folded -- 32 x 8 x 8 rows of 4 channels as 32 x 256 --
    and the same layers with LayerNormalization (no such fusions) do not."""
    monkeypatch.setenv(lowering.ENV, "bias")
    bn = make_program(_cnn_study(tmp_path), "v")
    assert bn.library_fusions
    assert "32x256xf32>" in bn.lower("train", 1).as_text()
    layers = [{"layer": "LayerNormalization"} if spec["layer"] == "BatchNormalization" else spec
              for spec in (*CNN_BN[:-1], {"layer": "Dense", "units": 64})]  # fmt: skip
    data = {"synthetic": {"kind": "normal", "shape": [96, 64], "seed": 2}}
    ln_study = _study(tmp_path / "ln", data, {"layers": layers}, batch_size=32, epochs=2,
                      shuffle=False)  # fmt: skip
    ln = make_program(ln_study, "v")
    assert not ln.library_fusions
    assert "x256xf32>" not in ln.lower("train", 1).as_text()


def test_lowerings_switch_off_for_a_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lowering.ENV, "0")
    study = _cnn_study(tmp_path)
    program = make_program(study, "v")
    text = program.lower("train", 1).as_text()
    assert "stablehlo.convolution" in text and "reduce_window" in text
