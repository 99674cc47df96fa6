"""ablab.engine.small_products: the per-seed small-products kernel (XLA FFI, built here).

Expected values are numpy's float64 products of the same float32 operands (the kernel sums
in float32, one fused multiply-add per term: agreement to float32 rounding of sums of at most
40 terms). Which products of the engine's programs run on it, and the engine against
``model.fit`` with it, are in tests/test_lowering.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablab.engine import small_products as sp

RNG = np.random.default_rng(7)
MODES = {sp.FORWARD: "A @ B", sp.INPUT_GRAD: "A @ B.T", sp.KERNEL_GRAD: "A.T @ B"}


def require_kernel() -> None:
    """The kernel builds wherever a C++ compiler is; CI (``make``) has one, so there a kernel
    that is not available fails the test instead of skipping it."""
    if sp.available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"the small-products kernel is not available: {sp.unavailable_reason()}")
    pytest.skip(f"no small-products kernel here: {sp.unavailable_reason()}")


def _operands(mode: int, s: int, m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    shapes = {
        sp.FORWARD: ((s, m, k), (s, k, n)),
        sp.INPUT_GRAD: ((s, m, k), (s, n, k)),
        sp.KERNEL_GRAD: ((s, k, m), (s, k, n)),
    }[mode]
    return tuple(RNG.normal(size=shape).astype(np.float32) for shape in shapes)  # type: ignore[return-value]


def _numpy(mode: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if mode == sp.FORWARD:
        return a64 @ b64
    if mode == sp.INPUT_GRAD:
        return a64 @ np.swapaxes(b64, 1, 2)
    return np.swapaxes(a64, 1, 2) @ b64


def _kernel(mode: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda x, y: sp.call(mode, x, y))(a, b))


# seeds, output rows M, contraction K, output width N: every width (8-lane vectors up to 8,
# 16 above), row counts around the kernel's blocks of 8, contractions of one to 300 rows
SHAPES = [
    (1, 1, 1, 1),
    (3, 4, 8, 12),
    (2, 5, 12, 8),
    (4, 7, 3, 16),
    (2, 32, 16, 5),
    (3, 9, 40, 2),
    (1, 16, 1, 13),
    (2, 2, 9, 11),
    (2, 17, 9, 8),  # blocks of 8 rows and one more; a kernel gradient of 17 rows (> 16)
    (3, 300, 9, 8),  # a convolution's im2col rows (3 x 3 windows, 8 filters)
    (2, 20, 5, 7),
]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("s", "m", "k", "n"), SHAPES)
def test_products_match_numpy(mode: int, s: int, m: int, k: int, n: int, shared: bool) -> None:
    """Per seed, and with ``A`` one matrix every seed shares (a first layer's data)."""
    require_kernel()
    a, b = _operands(mode, s, m, k, n)
    if shared:
        a = a[0]
    got = _kernel(mode, a, b)
    assert got.shape == (s, m, n) and got.dtype == np.float32
    want = _numpy(mode, np.broadcast_to(a, (s, *a.shape[-2:])), b)
    # float32 sums of at most 40 products of N(0,1) values
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k), err_msg=MODES[mode])


def test_the_seed_autoencoders_products() -> None:
    """The shapes it was written for: 625 seeds (a cell), batches of 32 rows, 8 -> 12."""
    require_kernel()
    for mode, (m, k, n) in {
        sp.FORWARD: (32, 8, 12),
        sp.INPUT_GRAD: (32, 12, 8),
        sp.KERNEL_GRAD: (8, 32, 12),
    }.items():
        a, b = _operands(mode, 625, m, k, n)
        np.testing.assert_allclose(_kernel(mode, a, b), _numpy(mode, a, b), rtol=1e-5, atol=1e-4)


def test_non_finite_values_spread_as_in_a_matmul() -> None:
    """A NaN or inf reaches exactly the outputs it reaches in numpy's float32 matmul (the
    kernel's unused vector lanes hold zeros and are never stored)."""
    require_kernel()
    a, b = _operands(sp.FORWARD, 2, 5, 4, 6)
    a[0, 1, 2] = np.nan
    a[1, 3, 0] = np.inf
    b[1, 2, 4] = -np.inf
    got = _kernel(sp.FORWARD, a, b)
    with np.errstate(invalid="ignore"):
        want = a @ b
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_operands_that_do_not_fit_are_refused() -> None:
    a = jnp.zeros((2, 3, 4), jnp.float32)
    b = jnp.zeros((2, 4, 5), jnp.float32)
    assert sp.fits(sp.FORWARD, a, b) and sp.fits(sp.FORWARD, a[0], b)  # A shared: rank 2
    refused = [
        (sp.FORWARD, a, jnp.zeros((2, 4, 17), jnp.float32)),  # an output row of 17
        (sp.FORWARD, a, jnp.zeros((2, 5, 5), jnp.float32)),  # contraction 4 vs 5
        (sp.FORWARD, a, jnp.zeros((3, 4, 5), jnp.float32)),  # 2 seeds vs 3
        (sp.FORWARD, a.astype(jnp.float16), b.astype(jnp.float16)),  # float32 only
        (sp.FORWARD, a, b[0]),  # B without its seeds axis (A may be shared, B not)
        (sp.FORWARD, a[0, 0], b),  # A of rank 1
        (sp.INPUT_GRAD, a, b),  # B must be (seeds, N, K): its K 5 is not A's 4
        (sp.KERNEL_GRAD, a, b),  # A (seeds, K, M): K 3 is not B's 4
    ]
    for mode, x, y in refused:
        assert not sp.fits(mode, x, y), (mode, x.shape, y.shape, x.dtype)
        with pytest.raises(ValueError, match="do not fit the kernel"):
            sp.call(mode, x, y)


def test_build_is_kept_and_written_whole(tmp_path: Path) -> None:
    """Built once into its keyed folder (``$CXX`` may be a command line: here ``env c++``);
    asked again, the same file without rebuilding; no temporary file left beside it."""
    require_kernel()
    path = sp.build(tmp_path, cxx=f"env {sp.compiler()}")
    assert path.is_file() and path.parent.parent == tmp_path
    stamp = path.stat().st_mtime_ns
    assert sp.build(tmp_path, cxx=f"env {sp.compiler()}") == path
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_missing_or_failing_compiler_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(sp.BuildError, match=r"failed to build small_products\.cc"):
        sp.build(tmp_path, cxx=str(tmp_path / "no-such-c++"))
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'this compiler refuses' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(sp.BuildError, match="this compiler refuses"):
        sp.build(tmp_path / "out", cxx=str(failing))
    # nothing half-written: only the empty keyed folders
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_kernels_folder_is_per_machine_not_per_compilation_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ABLAB_KERNELS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    for cache in ("/some/cache", "0", ""):  # a fresh compilation cache does not rebuild it
        monkeypatch.setenv("ABLAB_COMPILATION_CACHE", cache)
        assert sp.kernels_dir() == Path("/xdg/ablab/kernels")
    monkeypatch.setenv("ABLAB_KERNELS", "/mine")
    assert sp.kernels_dir() == Path("/mine")


def test_a_damaged_library_is_built_again(tmp_path: Path) -> None:
    require_kernel()
    damaged = tmp_path / "small_products.so"
    damaged.write_bytes(b"not a shared library")
    library = sp._load(damaged)
    assert not damaged.exists()
    assert hasattr(library, sp.SYMBOL) and hasattr(library, sp.FMA_SYMBOL)


def test_the_kernels_rounding_is_named() -> None:
    """Part of the numerics fingerprint: a build with fused multiply-adds and one without
    round differently (``-march=native`` on a CPU with FMA gives ``fma``)."""
    require_kernel()
    assert sp.numerics() in ("fma", "mul-add")


def test_adams_update_matches_its_formula() -> None:
    """``adam``: Keras' Adam update in one pass, against the same formula in numpy (float64
    from the same float32 inputs): ``m' = m + (g - m) c1``, ``v' = v + (g^2 - v) c2``,
    ``p' = p - m' alpha / (sqrt(v') + eps)``, the rate per seed."""
    require_kernel()
    g, m, p = (RNG.normal(size=(3, 37)).astype(np.float32) for _ in range(3))
    v = np.abs(RNG.normal(size=(3, 37))).astype(np.float32)
    alpha = np.asarray([1e-3, 2e-3, 5e-4], np.float32)
    c1, c2, eps = 0.1, 0.001, 1e-7
    got = jax.jit(lambda *a: sp.adam(*a, c1, c2, eps))(g, m, v, p, alpha)
    g64, m64, v64, p64 = (a.astype(np.float64) for a in (g, m, v, p))
    m2 = m64 + (g64 - m64) * c1
    v2 = v64 + (g64 * g64 - v64) * c2
    p2 = p64 - m2 * alpha[:, None] / (np.sqrt(v2) + eps)
    for a, b in zip(got, (m2, v2, p2), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
    assert not sp.adam_fits(g, m, v, p, alpha[:2])  # one rate per seed
    assert not sp.adam_fits(g[:, :5], m, v, p, alpha)  # every array the same shape
    assert not sp.adam_fits(g.astype(np.float16), m, v, p, alpha)
    with pytest.raises(ValueError, match="do not fit"):
        sp.adam(g[None], m[None], v[None], p[None], alpha, c1, c2, eps)


# -- max pooling over tiling windows -----------------------------------------------------------


def _numpy_max_pool(x: np.ndarray, pool: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """numpy: each window's maximum (NaN if it holds one), cropped as ``valid``, and the offset
    XLA's ``select_and_scatter`` with ``>=`` selects: the elements in row-major order, the
    selected one kept while it is ``>=`` the next -- the first maximum without NaN (checked
    against ``np.argmax(window == max)`` below)."""
    ph, pw = pool
    *lead, h, w, c = x.shape
    oh, ow = h // ph, w // pw
    win = x[..., : oh * ph, : ow * pw, :].reshape(*lead, oh, ph, ow, pw, c)
    win = np.moveaxis(win, -4, -3).reshape(*lead, oh, ow, ph * pw, c)  # (.., oh, ow, p, c)
    y = win.max(axis=-2)
    selected, first = win[..., 0, :], np.zeros(y.shape, np.int64)
    for i in range(1, ph * pw):
        with np.errstate(invalid="ignore"):
            keep = selected >= win[..., i, :]
        selected = np.where(keep, selected, win[..., i, :])
        first = np.where(keep, first, i)
    no_nan = ~np.isnan(win).any(axis=-2)
    np.testing.assert_array_equal(first[no_nan], np.argmax(win == y[..., None, :], axis=-2)[no_nan])
    return y, first.astype(np.uint8)


def _numpy_max_pool_grad(
    g: np.ndarray, first: np.ndarray, pool: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    ph, pw = pool
    *lead, oh, ow, c = g.shape
    dx = np.zeros((*lead, *size, c), np.float32)
    for idx in np.ndindex(*lead, oh, ow, c):
        *n, i, j, ch = idx
        k = int(first[idx])
        dx[(*n, i * ph + k // pw, j * pw + k % pw, ch)] = g[idx]
    return dx


# leading axes, (H, W), channels, pool: 8-channel vectors, the one-at-a-time rest, cropping,
# a window of one row (a 1-d pool), windows of 9 elements
POOLS = [
    ((2, 3), (8, 8), 8, (2, 2)),
    ((4,), (9, 7), 3, (2, 2)),
    ((2,), (6, 6), 11, (3, 3)),
    ((3,), (1, 12), 16, (1, 3)),
    ((), (4, 6), 5, (2, 3)),
]


@pytest.mark.parametrize(("lead", "size", "c", "pool"), POOLS)
def test_max_pool_and_its_gradient_match_numpy(
    lead: tuple, size: tuple, c: int, pool: tuple[int, int]
) -> None:
    """The maximum of each window and, for the gradient, its first maximum in row-major
    order: exact (a selection), ties included; rows and columns past the last whole window
    get no gradient."""
    require_kernel()
    x = RNG.normal(size=(*lead, *size, c)).astype(np.float32)
    x.reshape(-1, c)[::3] = 0.5  # ties inside windows (and ReLU-like all-equal ones)
    y, first = jax.jit(lambda a: sp.max_pool(a, pool))(x)
    want_y, want_first = _numpy_max_pool(x, pool)
    np.testing.assert_array_equal(np.asarray(y), want_y)
    np.testing.assert_array_equal(np.asarray(first), want_first)
    g = RNG.normal(size=want_y.shape).astype(np.float32)
    dx = jax.jit(lambda g, f: sp.max_pool_grad(g, f, pool, size))(g, first)
    np.testing.assert_array_equal(np.asarray(dx), _numpy_max_pool_grad(g, want_first, pool, size))


def test_max_pool_spreads_nan_and_runs_under_vmap() -> None:
    """A NaN makes its window's maximum NaN; the gradient goes where XLA's select_and_scatter
    sends it (tests/test_lowering.py checks that against Keras); under ``vmap`` the seeds are
    one more leading axis of the same call."""
    require_kernel()
    x = RNG.normal(size=(3, 2, 4, 4, 9)).astype(np.float32)
    x[0, 1, 1, 0, 2] = np.nan  # window (0, 0) of channel 2: offset 2
    x[2, 0, 3, 3, 8] = np.nan  # the last lane of the vector's rest
    y, first = jax.jit(jax.vmap(lambda a: sp.max_pool(a, (2, 2))))(x)
    want_y, want_first = _numpy_max_pool(x, (2, 2))
    np.testing.assert_array_equal(np.asarray(y), want_y)  # NaN where numpy's max is NaN
    assert np.isnan(np.asarray(y)[0, 1, 0, 0, 2]) and np.isnan(np.asarray(y)[2, 0, 1, 1, 8])
    np.testing.assert_array_equal(np.asarray(first), want_first)
    g = RNG.normal(size=want_y.shape).astype(np.float32)
    grad = jax.vmap(lambda g, f: sp.max_pool_grad(g, f, (2, 2), (4, 4)))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(grad)(g, first)), _numpy_max_pool_grad(g, want_first, (2, 2), (4, 4))
    )


def test_max_pools_that_do_not_fit_are_refused() -> None:
    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    assert sp.max_pool_fits(x, (2, 2)) and sp.max_pool_fits(x[0], (8, 8))
    for a, pool in (
        (x.astype(jnp.float16), (2, 2)),  # float32 only
        (x, (9, 1)),  # taller than the input
        (jnp.zeros((1, 16, 16, 1), jnp.float32), (16, 16)),  # 256 elements: offsets are bytes
        (x[0, 0], (1, 2)),  # rank 2: no (H, W, C)
    ):
        assert not sp.max_pool_fits(a, pool), (a.shape, a.dtype, pool)
        with pytest.raises(ValueError, match="does not fit the kernel"):
            sp.max_pool(a, pool)
    with pytest.raises(ValueError, match="max_pool_grad"):
        sp.max_pool_grad(x, jnp.zeros((2, 8, 8, 3), jnp.int32), (2, 2), (16, 16))
