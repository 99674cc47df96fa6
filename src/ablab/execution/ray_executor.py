"""The Ray executor: a run's cells as Ray core tasks on a cluster (``--executor ray``).

The driver (the ``ablab run`` process) puts the study and its loaded rows in Ray's object
store once, then submits one task per cell. A task builds the variant's program in the worker
(once per study, variant and probe setting: workers keep it for the next cell of the same
variant), trains the cell with :func:`ablab.execution.executors.train_cell` -- the very call
:class:`~ablab.execution.executors.LocalExecutor` makes -- and returns the result together with the
worker's environment fingerprint. The driver yields each result as it arrives, so the run
stores it at once and ``--resume`` finds it after an interruption.

Identical numbers are the contract: a cell's result depends only on the study, the variant,
the seed ids and the chunk size (the compiled program's shape), *given the same software*.
So the driver compares every worker's fingerprint (python, ablab and its source, keras, jax,
jaxlib, numpy, the numerics settings) with its own and refuses results from a worker that
differs (:class:`WorkerMismatch`).

CPU share and JAX threads: a task asks Ray for ``TASK_CPUS`` (1) CPU, but XLA inside it is
left exactly as configured on the driver -- it still sizes its thread pool to the node's
cores. Limiting XLA to one thread (``--xla_cpu_multi_thread_eigen=false``) would be the
tidy way to honour the 1-CPU share, but XLA's CPU thread count can change how a large
contraction is split and summed, i.e. the last bits of the result; the executor would then
no longer match a local run bit for bit. Instead, give each node as many Ray CPUs as cells
it should run at once. One cell's program keeps only ~1.3 of 2 cores busy (its ops are tiny,
each split over XLA's pool and joined again; measured on a 2-core machine, where two at
once were fastest), so start from ``ray start --num-cpus=min(cores, 8)`` -- what the local
executor would run -- and measure; fewer when memory is short (each worker process holds its
own imports and compiled programs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import platform
import socket
import traceback
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ablab.engine.data import Dataset
from ablab.engine.program import VariantProgram
from ablab.errors import AblabError, InputError
from ablab.execution.env import data_digest, differing_keys, environment_fingerprint
from ablab.execution.executors import Cell, CellResult, train_cell
from ablab.study.schema import Study

TASK_CPUS = 1
"""Ray CPUs one cell's task asks for (see the module docstring on XLA's threads)."""

CONNECT_TIMEOUT_S = 5.0
"""How long to wait for the cluster's address to accept a TCP connection. ``ray.init``
itself retries an unreachable address for minutes; this check fails in seconds instead."""

PROGRAMS_PER_WORKER = 8
"""Programs a worker process keeps (least recently used dropped): each holds the model,
its compiled executables and the training rows on the device."""

_FORWARDED_ENV = (
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_ENABLE_X64",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "JAX_DEFAULT_PRNG_IMPL",
    "JAX_THREEFRY_PARTITIONABLE",
)
"""Driver environment variables that shape XLA's programs or numbers: workers get the
driver's values (``KERAS_BACKEND`` is always ``jax``)."""


class RayExecutorError(AblabError):
    """The cluster could not be reached or lost a task (exit code 1)."""


class WorkerMismatch(RayExecutorError):
    """A worker runs other versions or numerics settings than the driver (exit code 1)."""


# -- environment fingerprints (ablab.execution.env) ----------------------------------------
def worker_location() -> dict[str, Any]:
    """Where a task ran: Ray node id, host, process id, full platform string, core count
    (reported, never compared: a cluster's nodes may differ in kernel or CPU count)."""
    node = None
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker (tests, the driver)
        pass
    return {
        "node": node,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def check_worker(driver: dict[str, str], worker: dict[str, str], where: dict[str, Any]) -> None:
    """Refuse a worker whose fingerprint differs from the driver's (its numbers could
    differ from a local run's); the message names every difference."""
    diffs = differing_keys(driver, worker)
    if not diffs:
        return
    detail = "; ".join(
        f"{k}: worker {worker.get(k, 'unknown')!s}, driver {driver.get(k, 'unknown')!s}"
        for k in diffs
    )
    if "ablab_source" in diffs:
        detail += " (ablab_source: a digest of ablab's own code -- another checkout, or files "
        detail += "edited after the driver started)"
    node = where.get("node") or "?"
    raise WorkerMismatch(
        f"Ray worker {where.get('host', '?')} (pid {where.get('pid', '?')}, node "
        f"{str(node)[:12]}) differs from this driver -- {detail}. Its results would not be "
        "identical to a local run, so ablab refuses them.",
        fix="install the same ablab, keras, jax, jaxlib and numpy (and Python) on every node "
        "and on the driver (e.g. the same `pip install 'ablab[ray]'` lock/environment), with "
        "the same KERAS/JAX settings, XLA_FLAGS and $ABLAB_LOWERINGS, and a C++ compiler on "
        "every node or on none (ablab's small-products kernel)",
    )


def study_fingerprint(study: Study, data: Dataset) -> str:
    """A stable digest of the resolved study and its rows: workers key their cached
    programs by it, so a new study (or changed data) never reuses an old program."""
    h = hashlib.sha256()
    h.update(json.dumps(study.resolved(), sort_keys=True, default=repr).encode())
    builder = study.model.builder
    if callable(builder):  # resolved() only names it; its code matters too
        import cloudpickle

        h.update(cloudpickle.dumps(builder))
    h.update(data_digest(data.x, data.y, data.sample_weight).encode())
    return h.hexdigest()[:24]


# -- the task (runs in a Ray worker process) -------------------------------------------
_PROGRAMS: OrderedDict[tuple[str, str, bool], VariantProgram] = OrderedDict()


def _program(study: Study, data: Dataset, key: str, cell: Cell) -> VariantProgram:
    """The worker's program for the cell's variant and probe setting, built once."""
    k = (key, cell.variant, cell.probes)
    program = _PROGRAMS.get(k)
    if program is None:
        from ablab.engine.build import build_program

        program = build_program(study, cell.variant, data, probes=cell.probes)
        _PROGRAMS[k] = program
        while len(_PROGRAMS) > PROGRAMS_PER_WORKER:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(k)
    return program


@dataclass(frozen=True)
class _Failure:
    """An exception raised in a worker, carried back as plain data.

    ablab's own errors cannot go through pickle as they are (``StudyError`` takes keyword
    arguments only), and a class from a user's builder file may not import on the driver;
    so the worker pickles (class, args, attributes) itself and the driver rebuilds the
    exception without calling ``__init__`` -- same type, message and fields -- or, if that
    fails, raises a RuntimeError naming the original type.
    """

    type_name: str
    message: str
    payload: bytes | None
    remote_traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        try:
            payload: bytes | None = pickle.dumps((type(exc), exc.args, dict(vars(exc))))
        except Exception:
            payload = None
        return cls(
            f"{type(exc).__module__}.{type(exc).__qualname__}",
            str(exc),
            payload,
            "".join(traceback.format_exception(exc)),
        )

    def rebuild(self, where: dict[str, Any]) -> BaseException:
        exc: BaseException
        try:
            assert self.payload is not None
            kind, args, state = pickle.loads(self.payload)
            exc = kind.__new__(kind)
            exc.args = args
            exc.__dict__.update(state)
        except Exception:
            exc = RuntimeError(f"{self.type_name}: {self.message}")
        exc.add_note(
            f"(raised in a Ray worker on {where.get('host')}, pid {where.get('pid')}; "
            f"its traceback:)\n{self.remote_traceback.rstrip()}"
        )
        return exc


@dataclass(frozen=True)
class _Reply:
    result: CellResult | None
    failure: _Failure | None
    fingerprint: dict[str, str]
    where: dict[str, Any]


def _train_task(
    study: Study,
    data: Dataset,
    key: str,
    cell: Cell,
    reference: bool,
    expected: dict[str, str],
) -> _Reply:
    """One cell, in a worker. A worker whose fingerprint differs from the driver's
    (``expected``) trains nothing: the driver refuses it anyway."""
    fingerprint = environment_fingerprint()
    where = worker_location()
    if fingerprint != expected:
        return _Reply(None, None, fingerprint, where)
    try:
        result = train_cell(_program(study, data, key, cell), cell, reference=reference)
    except Exception as exc:
        return _Reply(None, _Failure.of(exc), fingerprint, where)
    return _Reply(result, None, fingerprint, where)


# -- the driver side --------------------------------------------------------------------
def _import_ray(study: Study) -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError(
            where=study.source,
            key="--executor",
            expected="the ray package for --executor ray",
            got="ray is not installed",
            fix="pip install 'ablab[ray]' (the same versions on every node of the cluster), "
            "or use --executor local",
        ) from exc
    return ray


def _tcp_target(address: str) -> tuple[str, int] | None:
    """(host, port) of a concrete ``host:port`` or ``ray://host:port`` address; None for
    the words Ray resolves itself (``auto``, ``local``)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at ``address`` (``ray.init`` would retry for
    minutes, printing warnings)."""
    target = _tcp_target(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayExecutorError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}).",
            fix="start one (`ray start --head --port=6379` on the head node, "
            "`ray start --address=HEAD:6379` on the others) and pass its address with "
            "--address HOST:PORT, or set RAY_ADDRESS",
        ) from exc


def _worker_env() -> dict[str, str]:
    env = {"KERAS_BACKEND": "jax"}
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    return env


class RayExecutor:
    """Trains cells as Ray core tasks, one per cell, and yields them as they finish.

    address: a cluster's ``HOST:PORT`` (or ``ray://HOST:PORT``); None follows ``ray.init()``
    -- ``RAY_ADDRESS``, else the cluster last started on this machine, else a new local
    instance. A Ray session this executor opened is closed by :meth:`close`: that stops a
    local instance it started and merely disconnects from a cluster it joined (which keeps
    running); one the caller had opened already is left alone.
    """

    name = "ray"

    def __init__(
        self,
        study: Study,
        data: Dataset,
        *,
        address: str | None = None,
        reference: bool = False,
    ) -> None:
        ray = _import_ray(study)
        self._ray = ray
        self._reference = reference
        self._owns_session = False
        if not ray.is_initialized():
            target = address if address is not None else os.environ.get("RAY_ADDRESS")
            if target:
                _check_reachable(target)
            try:
                ray.init(
                    address=address,
                    log_to_driver=False,  # the CLI's output stays ablab's own
                    logging_level=logging.ERROR,
                    include_dashboard=False,  # only matters for a local instance it starts
                )
            except (ConnectionError, TimeoutError, RuntimeError) as exc:
                raise RayExecutorError(
                    f"could not connect to Ray at {target or 'a local instance'}: {exc}"
                ) from exc
            self._owns_session = True
        self._fingerprint = environment_fingerprint()
        self._key = study_fingerprint(study, data)
        self._study_ref = ray.put(study)
        self._data_ref = ray.put(data)
        self._task = ray.remote(_train_task).options(
            num_cpus=TASK_CPUS,
            runtime_env={"env_vars": _worker_env()},
            max_retries=2,  # a worker lost to a node failure: rerun elsewhere (same result)
        )
        self.placements: dict[tuple[str, int], dict[str, Any]] = {}
        """Per finished cell key, where it ran (:func:`worker_location`)."""

    def _max_in_flight(self) -> int:
        """Enough queued tasks to keep every CPU busy, few enough that results do not pile
        up in the object store and an interrupt has little to cancel."""
        cpus = self._ray.cluster_resources().get("CPU", 1)
        return max(2, int(2 * cpus / TASK_CPUS))

    def run_cells(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellResult]]:
        ray = self._ray
        todo = list(cells)[::-1]  # pop() from the end = submit in the given order
        pending: dict[Any, Cell] = {}
        limit = self._max_in_flight()
        try:
            while todo or pending:
                while todo and len(pending) < limit:
                    cell = todo.pop()
                    ref = self._task.remote(
                        self._study_ref,
                        self._data_ref,
                        self._key,
                        cell,
                        self._reference,
                        self._fingerprint,
                    )
                    pending[ref] = cell
                # A timeout keeps the loop in Python so that Ctrl-C is seen promptly.
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in done:
                    cell = pending.pop(ref)
                    yield cell, self._receive(ref, cell)
        finally:
            for ref in pending:  # interrupted, failed or closed early: stop the rest
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def _receive(self, ref: Any, cell: Cell) -> CellResult:
        ray = self._ray
        try:
            reply: _Reply = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise RayExecutorError(
                f"cell {cell.variant!r} chunk {cell.chunk} was lost on the Ray cluster: {exc}"
            ) from exc
        check_worker(self._fingerprint, reply.fingerprint, reply.where)
        if reply.failure is not None:
            raise reply.failure.rebuild(reply.where)
        assert reply.result is not None
        self.placements[cell.key] = reply.where
        history, steps, epochs = reply.result
        # Arrays from the object store are read-only views of shared memory; the caller
        # gets writable arrays of its own, as from LocalExecutor.
        own = lambda d: None if d is None else {k: np.array(v) for k, v in d.items()}  # noqa: E731
        return own(history), own(steps), own(epochs)  # type: ignore[return-value]

    def close(self) -> None:
        if self._owns_session and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_session = False
