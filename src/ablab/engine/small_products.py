"""Per-seed products of small dense kernels on a compiled CPU kernel (an XLA FFI custom call).

Under ``vmap`` over seeds a Dense layer computes three products per step with a per-seed
kernel: its forward product ``(rows, in) @ (in, out)``, the input gradient ``g @ kernel.T``
and the kernel gradient ``x.T @ g`` -- with per-seed operands on both sides after the first
layer, whose input (the data) every seed shares. XLA's CPU backend runs these thousands of
tiny products (the seed autoencoder's are 32 x 8 x 12) on its GEMM library at ~15 GFLOP/s,
a third of the program's op time. ``small_products.cc`` keeps each seed's operands in
registers (an output row of at most 16 floats is one vector) and ran them 1.6-7x as fast; the
seed autoencoder's whole program 1.35x, + BN 1.3x (issue 17, docs/performance.md). A shared
operand (the data) is read by every seed's product. The same library holds Keras' Adam update
in one pass (:func:`adam`) and max pooling over tiling windows with its gradient
(:func:`max_pool`, :func:`max_pool_grad`).

The kernel is C++ built here with the machine's compiler (``$CXX``, else ``c++`` / ``g++``)
against jaxlib's FFI headers, once per machine: into ``<kernels>/<key>/`` where the key
covers the source, compiler, flags, jaxlib version and CPU, and ``<kernels>`` is
``$ABLAB_KERNELS``, else ``$XDG_CACHE_HOME/ablab/kernels`` or ``~/.cache/ablab/kernels``.
``make`` builds it when it sets up the ``.venv``; elsewhere the first program that uses it
builds it (~4 s, once). Without a compiler, or if the build fails, the engine
keeps XLA's products (:func:`available` is False; :func:`unavailable_reason` says why) --
the same values up to float32 rounding, only slower. ``$ABLAB_LOWERINGS`` without ``small``,
``adam`` and ``maxpool`` leaves it unused (``ablab.engine.lowering``).

``python -c 'from ablab.engine.small_products import main; main()'`` (what ``make`` runs) builds
it and prints where it is, or why not.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("small_products.cc")
TARGET = "ablab_small_products_v1"
"""The FFI target's name (a new ABI gets a new name: an executable kept in JAX's compilation
cache calls its target by name)."""
SYMBOL = "AblabSmallProducts"
ADAM_TARGET = "ablab_adam_v1"
"""The same library's fused Adam update (:func:`adam`)."""
ADAM_SYMBOL = "AblabAdam"
MAX_POOL_TARGET = "ablab_max_pool_v1"
"""The same library's max pooling over tiling windows (:func:`max_pool`) and its gradient
(``ablab_max_pool_grad_v1``, :func:`max_pool_grad`)."""
MAX_POOL_SYMBOL = "AblabMaxPool"
MAX_POOL_GRAD_TARGET = "ablab_max_pool_grad_v1"
MAX_POOL_GRAD_SYMBOL = "AblabMaxPoolGrad"
FMA_SYMBOL = "AblabSmallProductsFusedMultiplyAdd"
_HANDLERS = (
    (TARGET, SYMBOL),
    (ADAM_TARGET, ADAM_SYMBOL),
    (MAX_POOL_TARGET, MAX_POOL_SYMBOL),
    (MAX_POOL_GRAD_TARGET, MAX_POOL_GRAD_SYMBOL),
)
"""Each FFI target of the library and the handler symbol registered under it."""
TARGETS = tuple(target for target, _ in _HANDLERS)
"""Every FFI target of the library (a kept trace may call any of them)."""
MAX_WIDTH = 16
"""The widest output row (one vector of 16 float32 lanes)."""
FORWARD, INPUT_GRAD, KERNEL_GRAD = 0, 1, 2
"""Modes: ``A @ B``, ``A @ B.T``, ``A.T @ B``, per seed."""
FLAGS = ("-O3", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17", "-w")
ARCH_FLAGS = (("-march=native",), ())
"""Tried in order: tuned for this CPU, then portable (a compiler that knows no ``native``)."""
BUILD_TIMEOUT_S = 300
KERNELS_ENV = "ABLAB_KERNELS"

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ok": bool, "reason": str, "path": Path


class BuildError(RuntimeError):
    """The kernel could not be built (no compiler, or it failed)."""


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX`` (a command line, e.g. ``ccache g++``), else
    ``c++`` or ``g++`` on the PATH."""
    chosen = os.environ.get("CXX", "").strip()
    if chosen:
        return chosen
    return shutil.which("c++") or shutil.which("g++")


def kernels_dir() -> Path:
    """Where built kernels are kept: ``$ABLAB_KERNELS`` if set, else ``$XDG_CACHE_HOME/ablab/
    kernels`` or ``~/.cache/ablab/kernels`` -- per machine, not per compilation cache (a
    fresh ``$ABLAB_COMPILATION_CACHE`` folder does not rebuild it)."""
    chosen = os.environ.get(KERNELS_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ablab" / "kernels"


def _cpu() -> str:
    """What the CPU offers (``-march=native`` builds for it): its flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(cxx: str, flags: tuple[str, ...]) -> str:
    import jaxlib

    h = hashlib.sha256(SOURCE.read_bytes())
    for text in (
        cxx,
        " ".join(flags),
        jaxlib.__version__,
        sys.platform,
        platform.machine(),
        _cpu(),
    ):
        h.update(text.encode())
    return h.hexdigest()[:24]


def build(folder: Path | None = None, cxx: str | None = None) -> Path:
    """Build the kernel library into ``folder`` (default :func:`kernels_dir`) with ``cxx``
    (default :func:`compiler`) unless it is there already; its path. Written atomically: a
    concurrent build or a reader sees no half-written file. Raises :class:`BuildError`."""
    cxx = cxx or compiler()
    if not cxx:
        raise BuildError("no C++ compiler found ($CXX, c++ or g++ on the PATH)")
    folder = kernels_dir() if folder is None else folder
    paths = {arch: folder / _key(cxx, (*FLAGS, *arch)) / "small_products.so" for arch in ARCH_FLAGS}
    for path in paths.values():  # built before (the portable one where the tuned one failed)
        if path.exists():
            return path
    errors = []
    for arch, path in paths.items():
        flags = (*FLAGS, *arch)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"cannot write {path.parent}: {exc}") from exc
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
        except OSError as exc:
            raise BuildError(f"cannot write {path.parent}: {exc}") from exc
        os.close(fd)
        argv = [*shlex.split(cxx), *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(tmp, path)
                return path
            errors.append(f"{' '.join(arch) or 'portable'}: {done.stderr.strip()[-800:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{' '.join(arch) or 'portable'}: {type(exc).__name__}: {exc}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise BuildError(f"{cxx} failed to build {SOURCE.name}: " + " | ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    """The built library, loaded; a damaged one (it fails to load) is removed and built
    again, once."""
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.cdll.LoadLibrary(str(build()))


def _register(library: ctypes.CDLL) -> None:
    for target, symbol in _HANDLERS:
        handler = getattr(library, symbol)
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


def _require_available() -> None:
    """Raise ValueError (with :func:`unavailable_reason`) unless :func:`available`."""
    if not available():
        raise ValueError(f"the small-products kernel is not available: {unavailable_reason()}")


def available() -> bool:
    """Is the kernel built, loaded and registered with XLA in this process? Builds it on the
    first call if needed; False (never raises) when that fails -- :func:`unavailable_reason`."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            try:
                library = _load(build())
                _register(library)
                fused = bool(getattr(library, FMA_SYMBOL)())
                _state.update(ok=True, reason="", fused=fused)
            except Exception as exc:  # no compiler, a failed build, a library that won't load
                _state.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
    return bool(_state["ok"])


def numerics() -> str:
    """How this machine's kernel rounds (its part of a run's numerics fingerprint): ``fma``
    (each term added with a fused multiply-add), ``mul-add`` (a build without FMA rounds each
    product first), or ``unavailable``."""
    if not available():
        return "unavailable"
    return "fma" if _state["fused"] else "mul-add"


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True or was not asked yet)."""
    return str(_state.get("reason", ""))


def output_shape(mode: int, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int]:
    """``(seeds, M, N)`` of the products of ``a`` (per seed, or shared: no seeds axis) and
    ``b`` (per seed)."""
    a0, a1 = a[-2], a[-1]
    if mode == FORWARD:
        return b[0], a0, b[2]
    if mode == INPUT_GRAD:
        return b[0], a0, b[1]
    return b[0], a1, b[2]


def fits(mode: int, a: Any, b: Any) -> bool:
    """Can the kernel compute this product: float32 operands, ``b`` per seed (seeds first),
    ``a`` per seed or shared by every seed (rank 2), shapes that match, an output row of at
    most :data:`MAX_WIDTH`?"""
    if a.ndim not in (2, 3) or b.ndim != 3 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        return False
    if a.ndim == 3 and a.shape[0] != b.shape[0]:
        return False
    a0, a1 = a.shape[-2:]
    contracted = {
        FORWARD: (a1, b.shape[1]),
        INPUT_GRAD: (a1, b.shape[2]),
        KERNEL_GRAD: (a0, b.shape[1]),
    }[mode]
    width = output_shape(mode, a.shape, b.shape)[2]
    return contracted[0] == contracted[1] and 1 <= width <= MAX_WIDTH


def call(mode: int, a: jax.Array, b: jax.Array) -> jax.Array:
    """The per-seed products of ``a`` (per seed or shared) and ``b`` (seeds first) on the
    kernel. The kernel must be :func:`available` and the operands :func:`fits`; raises
    ValueError otherwise."""
    if not fits(mode, a, b):
        raise ValueError(
            f"small products (mode {mode}): operands {a.shape} {a.dtype} and {b.shape} "
            f"{b.dtype} do not fit the kernel (float32, b of rank 3, a of rank 3 or 2, "
            f"matching, output width <= "
            f"{MAX_WIDTH})"
        )
    _require_available()
    out = jax.ShapeDtypeStruct(output_shape(mode, a.shape, b.shape), jnp.float32)
    # under a further vmap (the engine has none): one call per outer element
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(a, b, mode=np.int64(mode))


def adam_fits(g: Any, m: Any, v: Any, p: Any, alpha: Any) -> bool:
    """Can :func:`adam` update these: float32 ``(seeds, n)`` arrays and a ``(seeds,)`` rate?"""
    if any(a.dtype != jnp.float32 or a.shape != g.shape for a in (g, m, v, p)):
        return False
    return g.ndim == 2 and alpha.dtype == jnp.float32 and alpha.shape == (g.shape[0],)


def adam(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    p: jax.Array,
    alpha: jax.Array,
    c1: float,
    c2: float,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keras' Adam update (without amsgrad) of one variable for every seed in one pass:
    ``m' = m + (g - m) * c1``, ``v' = v + (g * g - v) * c2``, ``p' = p - (m' * alpha) /
    (sqrt(v') + eps)``, with ``g, m, v, p`` of shape ``(seeds, n)`` and ``alpha`` ``(seeds,)``;
    returns ``(m', v', p')``. Raises ValueError where :func:`adam_fits` does not hold or the
    kernel is not :func:`available`."""
    if not adam_fits(g, m, v, p, alpha):
        shapes = [(a.shape, str(a.dtype)) for a in (g, m, v, p, alpha)]
        raise ValueError(f"adam: arrays {shapes} do not fit (float32 (seeds, n), alpha (seeds,))")
    _require_available()
    out = jax.ShapeDtypeStruct(g.shape, jnp.float32)
    call = jax.ffi.ffi_call(ADAM_TARGET, (out, out, out), vmap_method="sequential")
    scalars = {"c1": np.float32(c1), "c2": np.float32(c2), "eps": np.float32(eps)}
    m2, v2, p2 = call(g, m, v, p, alpha, **scalars)
    return m2, v2, p2


MAX_POOL_WINDOW = 255
"""The most elements a window may have (an offset inside it is a byte)."""


def max_pool_fits(x: Any, pool: tuple[int, int]) -> bool:
    """Can :func:`max_pool` pool ``x`` (float32, ``(.., H, W, C)``) by ``pool`` windows?"""
    ph, pw = pool
    return (
        x.dtype == jnp.float32
        and x.ndim >= 3
        and 1 <= ph <= x.shape[-3]
        and 1 <= pw <= x.shape[-2]
        and ph * pw <= MAX_POOL_WINDOW
        and x.shape[-1] >= 1
    )


def max_pool(x: jax.Array, pool: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Max pooling of channels-last ``x`` ``(.., H, W, C)`` over the ``pool`` windows that tile
    it (stride = pool; rows and columns past the last whole window are left out, as ``valid``
    padding does): ``(y, first)``, ``y`` ``(.., H // ph, W // pw, C)`` -- each window's
    maximum, bit for bit ``reduce_window``'s (NaN where the window holds one, +0 over -0) --
    and ``first`` (uint8, the same shape) the offset inside each window, row-major, that XLA's
    ``select_and_scatter`` with ``>=`` picks for the gradient: the elements in order, the
    selected one kept while it is ``>=`` the next (the first maximum where there is no NaN).
    Raises ValueError where :func:`max_pool_fits` does not hold or the kernel is not
    :func:`available`."""
    if not max_pool_fits(x, pool):
        raise ValueError(f"max_pool: {x.shape} {x.dtype} by {pool} does not fit the kernel")
    _require_available()
    ph, pw = pool
    shape = (*x.shape[:-3], x.shape[-3] // ph, x.shape[-2] // pw, x.shape[-1])
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.uint8))
    # every leading axis is a batch axis of the kernel's: a vmap adds one
    call = jax.ffi.ffi_call(MAX_POOL_TARGET, out, vmap_method="expand_dims")
    y, first = call(x, ph=np.int64(ph), pw=np.int64(pw))
    return y, first


def max_pool_grad(
    g: jax.Array, first: jax.Array, pool: tuple[int, int], size: tuple[int, int]
) -> jax.Array:
    """The gradient of :func:`max_pool`: ``g`` ``(.., OH, OW, C)`` sent to each window's first
    maximum (``first``), zero elsewhere: ``(.., H, W, C)`` with ``size = (H, W)``."""
    if g.dtype != jnp.float32 or first.dtype != jnp.uint8 or g.shape != first.shape:
        raise ValueError(f"max_pool_grad: g {g.shape} {g.dtype}, first {first.shape} {first.dtype}")
    _require_available()
    out = jax.ShapeDtypeStruct((*g.shape[:-3], *size, g.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call(MAX_POOL_GRAD_TARGET, out, vmap_method="broadcast_all")
    return call(g, first, ph=np.int64(pool[0]), pw=np.int64(pool[1]))


def main() -> int:
    """Build the kernel (``make`` runs this when it sets up the .venv); 0 when it is ready."""
    try:
        path = build()
        _register(_load(path))
    except Exception as exc:
        print(f"ablab: the small-products kernel is not built ({exc}); the engine keeps XLA's")
        print("products (the same results, slower on small dense layers)")
        return 0  # not an error: everything works without it
    print(f"ablab: small-products kernel ready: {path}")
    return 0
