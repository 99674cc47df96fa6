"""Compile several of the engine's programs at once, each distinct program only once.

XLA compiles one program on one core, so a cold start on 2 cores compiles two programs in the
time of one -- but studies are full of programs that are the same program: an identity layer,
a BatchNormalization placed either side of a linear activation, a variant that only renames
another (the flagship's ``plain`` / ``plain_identity`` and ``bn`` / ``bn_after`` each lower to
one StableHLO module). Compiled side by side, such twins cost two compiles; compiled one after
the other, the second is a hit in JAX's persistent compilation cache (~0.1 s).

:func:`compile_programs` lowers (traces) the programs one by one in the calling thread while
earlier ones compile in a pool, and holds back a program whose StableHLO text equals one
still compiling until that compile has finished. The text only orders the work: what is
compiled, and the cache key it is stored under, is JAX's (the cache keys each entry by the
module, the compile options and the versions), so a fingerprint that matched two different
programs would cost time, never a wrong executable. With the persistent cache off, twins
compile twice, as before. The fingerprints are recorded on each program
(``VariantProgram.record_fingerprint``): the checks share one compiled trajectory program
between variants proven the same by more than the text (``VariantProgram.same_program_as``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    from ablab.engine.program import VariantProgram

Job = tuple["VariantProgram", str, int]
"""(program, which -- "train", "trajectory" or "init" --, seeds)."""


class _Cancelled(Exception):
    pass


def fingerprint(lowered: Any) -> str | None:
    """SHA-256 of a lowered program's StableHLO text without debug locations; None when it
    has no text (then it is held back behind nothing)."""
    try:
        text = lowered.as_text(debug_info=False)
    except Exception:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def lowering_order(jobs: Sequence[Job]) -> list[int]:
    """Job indices, the costliest program to compile first (``compile_cost()``; ties in job
    order). On 2 cores the last compile to start decides when
    compiling ends: the flagship lowered ``plain``, its twin, then ``bn`` -- whose compile
    takes ~1.5x plain's -- so ``bn`` started compiling ~2.5 s in, and one core sat idle at
    the end while it finished. Costliest first, the cheap compiles fill in beside it."""
    return sorted(range(len(jobs)), key=lambda i: -jobs[i][0].compile_cost(jobs[i][1]))


def _after(
    prior: Future, pool: ThreadPoolExecutor, task: Callable[[], float], stop: threading.Event
) -> Future:
    """``task`` submitted to ``pool`` once ``prior`` is done (whatever its outcome), unless
    ``stop`` is set by then (the future is then cancelled)."""
    out: Future = Future()

    def copy(inner: Future) -> None:
        try:
            out.set_result(inner.result())
        except BaseException as exc:  # its own failure, or cancelled by a shutdown
            out.set_exception(exc)

    def go(_: Future) -> None:
        if stop.is_set():
            out.cancel()
            return
        if not out.set_running_or_notify_cancel():  # cancelled while it waited
            return
        try:
            pool.submit(task).add_done_callback(copy)
        except RuntimeError as exc:  # the pool was shut down (an interrupted compile)
            out.set_exception(exc)

    prior.add_done_callback(go)
    return out


def compile_programs(
    jobs: Sequence[Job],
    workers: int,
    *,
    done: Callable[[int, float], None] | None = None,
    wrap_error: Callable[[int, BaseException], BaseException | None] | None = None,
    cancel: threading.Event | None = None,
) -> list[float]:
    """Compile every job (skipping what its program has compiled already), up to ``workers``
    at once; returns seconds per job (its lowering plus its compile, not the time it waited;
    for a job compiled before, the seconds it took then).

    Lowering runs here, the costliest program first (:func:`lowering_order`), with Keras'
    traceback filtering off (its frames name the layer that failed:
    ``VariantProgram.culprit``), at most ``workers + 1`` programs ahead of the compiles (a
    lowered program holds its whole module); compiles run in a pool of ``workers`` threads,
    a job whose program equals one still compiling after it (module docstring). done(i,
    seconds) is called here for each job in job order as it finishes, until one fails. On
    failure the earliest failing job's exception (in job order) is raised, as
    ``wrap_error(i, exc)`` when that returns one (chained to the original), else as it is;
    after a failed lowering only the jobs before it in job order are lowered (one of them
    may fail too, and be the one to report). cancel: once set, nothing more is lowered or
    started (what runs finishes), and the jobs not compiled are left to compile when first
    used. Interrupted (KeyboardInterrupt), it starts nothing more either.
    """
    seconds = [0.0] * len(jobs)
    futures: dict[int, Future] = {}
    errors: dict[int, BaseException] = {}
    inflight: dict[str, Future] = {}
    stop = threading.Event()  # set on the way out of an interrupted or cancelled call
    slots = threading.Semaphore(max(1, workers) + 1)

    def stopped() -> bool:
        return stop.is_set() or (cancel is not None and cancel.is_set())

    filtering = keras.config.is_traceback_filtering_enabled()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        keras.config.disable_traceback_filtering()
        try:
            for i in lowering_order(jobs):
                program, which, n = jobs[i]
                if stopped():
                    break
                if errors and i > min(errors):  # a job before it failed to lower
                    continue
                if program.has_executable(which, n):
                    futures[i] = Future()
                    futures[i].set_result(program.compile_time(which, n))
                    continue
                slots.acquire()
                t0 = time.perf_counter()
                try:
                    lowered = program.lower(which, n)
                except Exception as exc:
                    slots.release()
                    errors[i] = exc
                    continue
                lower_s = time.perf_counter() - t0

                def task(
                    program: VariantProgram = program,
                    which: str = which,
                    n: int = n,
                    lowered: Any = lowered,
                    lower_s: float = lower_s,
                ) -> float:
                    try:
                        if stopped():  # queued, then interrupted or cancelled
                            return 0.0
                        t = time.perf_counter()
                        executable = lowered.compile(compiler_options=program.compiler_options())
                        took = lower_s + time.perf_counter() - t
                        program.adopt(which, n, executable, took)
                        return took
                    finally:
                        slots.release()

                key = fingerprint(lowered)
                del lowered  # (the task holds it until it has compiled)
                if key is not None:
                    program.record_fingerprint(which, n, key)
                prior = inflight.get(key) if key is not None else None
                if prior is None:
                    futures[i] = pool.submit(task)
                else:
                    futures[i] = _after(prior, pool, task, stop)
                if key is not None:
                    inflight[key] = futures[i]
        finally:
            if filtering:
                keras.config.enable_traceback_filtering()
        for i, future in sorted(futures.items()):
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            try:
                seconds[i] = future.result()
            except Exception as exc:
                errors[i] = exc
                continue
            if done is not None and not errors:
                done(i, seconds[i])
    except BaseException as exc:  # interrupted or cancelled: start nothing more
        stop.set()
        for future in reversed(futures.values()):  # twins first: they wait on the others
            future.cancel()
        # cancelled (a background prefetch): return once what runs has finished and been
        # adopted; interrupted: at once (the process waits for the running compile at exit)
        pool.shutdown(wait=isinstance(exc, _Cancelled), cancel_futures=True)
        if isinstance(exc, _Cancelled):
            return seconds
        raise
    pool.shutdown()
    if errors:
        first = min(errors)
        error = errors[first]
        wrapped = wrap_error(first, error) if wrap_error is not None else None
        if wrapped is not None:
            raise wrapped from error
        raise error
    return seconds


class Prefetch:
    """:func:`compile_programs` in a background thread, for programs needed later (the checks'
    while the seeds train): whoever needs them calls :meth:`wait` first, and finds them
    compiled. A failure here is not reported: the program compiles again when first used,
    and fails there, where it is reported. :meth:`cancel` (a run that failed or was
    interrupted) starts nothing more; the thread ends when what runs has finished, and the
    process waits for that at exit (one compile: seconds). The thread runs in a copy of
    the caller's context variables."""

    def __init__(self, jobs: Sequence[Job], workers: int) -> None:
        self._cancel = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run, list(jobs), workers), name="ablab-prefetch"
        )
        self._thread.start()

    def _run(self, jobs: list[Job], workers: int) -> None:
        with contextlib.suppress(Exception):  # compiled (and reported) again where used
            compile_programs(jobs, workers, cancel=self._cancel)

    def wait(self) -> None:
        self._thread.join()

    def cancel(self) -> None:
        self._cancel.set()
