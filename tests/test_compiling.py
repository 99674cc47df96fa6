"""Compiling several programs at once (ablab.engine.compiling): twins -- programs that lower to
the same StableHLO -- compile one after the other (the second is a persistent-cache hit
instead of a second compile side by side), others side by side; failures are the earliest
job's; a prefetch can be cancelled. The scheduling is tested with stand-in programs whose
compiles block on events (no timing), and the fingerprint on the engine's own programs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ablab
from ablab.engine.build import build_program
from ablab.engine.compiling import Prefetch, compile_programs, fingerprint
from tests.conftest import TINY_STUDY

WAIT_S = 30.0  # a bound on every wait: a scheduling bug fails the test instead of hanging it


class _Lowered:
    def __init__(self, text: str, log: list[tuple[str, str]], program: _Program) -> None:
        self.text, self.log, self.program = text, log, program

    def as_text(self, debug_info: bool = False) -> str:
        return self.text

    def compile(self, compiler_options: dict[str, Any]) -> str:
        p = self.program
        assert compiler_options == {"options of": p.name}  # the program's own, not a global
        self.log.append(("start", p.name))
        if p.compile_error is not None:
            raise p.compile_error
        if p.release is not None:  # held until the test lets it finish
            assert p.release.wait(WAIT_S), f"{p.name} was never released"
        self.log.append(("end", p.name))
        return f"executable of {p.name}"


class _Program:
    """What compile_programs needs of a VariantProgram: has_executable, lower, adopt,
    compiler_options, record_fingerprint, compile_cost."""

    def __init__(self, name: str, text: str, log: list[tuple[str, str]]) -> None:
        self.name, self.text, self.log = name, text, log
        self.release: threading.Event | None = None
        self.compile_error: BaseException | None = None
        self.lower_error: BaseException | None = None
        self.lowered = 0
        self.adopted: dict[tuple[str, int], Any] = {}
        self.fingerprints: dict[tuple[str, int], str] = {}
        self.cost = 1

    def has_executable(self, which: str, n: int) -> bool:
        return (which, n) in self.adopted

    def compiler_options(self) -> dict[str, Any]:
        return {"options of": self.name}

    def lower(self, which: str, n: int) -> _Lowered:
        self.lowered += 1
        self.log.append(("lower", self.name))
        if self.lower_error is not None:
            raise self.lower_error
        return _Lowered(self.text, self.log, self)

    def adopt(self, which: str, n: int, executable: Any, seconds: float) -> None:
        self.adopted.setdefault((which, n), executable)

    def record_fingerprint(self, which: str, n: int, fingerprint: str) -> None:
        self.fingerprints[(which, n)] = fingerprint

    def compile_cost(self, which: str) -> int:
        return self.cost

    def compile_time(self, which: str, n: int) -> float:
        return 1.5 if (which, n) in self.adopted else 0.0


def _wait_for(cond: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_twins_compile_one_after_the_other_and_others_side_by_side() -> None:
    log: list[tuple[str, str]] = []
    a, twin, other = (_Program(n, t, log) for n, t in [("a", "X"), ("twin", "X"), ("o", "Y")])
    a.release = threading.Event()
    done: list[tuple[int, float]] = []
    jobs = [(a, "train", 4), (twin, "train", 4), (other, "train", 4)]
    worker = threading.Thread(
        target=compile_programs, args=(jobs, 2), kwargs={"done": lambda i, s: done.append((i, s))}
    )
    worker.start()
    # `a` is held compiling: `other` (a different program) compiles meanwhile on the second
    # worker, while `twin` (the same text as `a`) has not started
    _wait_for(lambda: ("end", "o") in log)
    assert ("start", "twin") not in log
    a.release.set()
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert log.index(("start", "twin")) > log.index(("end", "a"))
    assert [i for i, _ in done] == [0, 1, 2]  # told in job order
    assert all(s >= 0 for _, s in done)
    assert twin.adopted == {("train", 4): "executable of twin"}


def test_what_is_compiled_already_is_skipped() -> None:
    log: list[tuple[str, str]] = []
    p = _Program("p", "X", log)
    p.adopted[("train", 4)] = "kept"
    done: list[tuple[int, float]] = []
    # (reported with the seconds it took when it was compiled)
    assert compile_programs([(p, "train", 4)], 2, done=lambda i, s: done.append((i, s))) == [1.5]
    assert p.lowered == 0 and log == [] and done == [(0, 1.5)]
    assert p.adopted[("train", 4)] == "kept"


def test_the_earliest_failing_job_is_raised_wrapped() -> None:
    log: list[tuple[str, str]] = []
    first, second, third = (_Program(n, n, log) for n in ("first", "second", "third"))
    first.compile_error = ValueError("compile failed")
    second.lower_error = KeyError("lowering failed")
    seen: list[int] = []

    def wrap(i: int, exc: BaseException) -> BaseException:
        seen.append(i)
        return RuntimeError(f"job {i}: {exc}")

    jobs = [(first, "train", 4), (second, "train", 4), (third, "train", 4)]
    with pytest.raises(RuntimeError, match="job 0: compile failed") as info:
        compile_programs(jobs, 2, wrap_error=wrap)
    assert isinstance(info.value.__cause__, ValueError) and seen == [0]
    assert third.lowered == 0  # nothing after a failed lowering is lowered
    # unwrapped when wrap_error has nothing to say
    with pytest.raises(KeyError):
        compile_programs([(second, "train", 4)], 1, wrap_error=lambda i, e: None)


def test_the_costliest_program_is_lowered_and_compiled_first() -> None:
    """On 2 cores the last compile to start decides when compiling ends: the flagship's BN
    program (compile_cost 26 probed, plain's 12) started ~2.5 s late behind plain and its twin."""
    log: list[tuple[str, str]] = []
    cheap, twin, costly = (_Program(n, n, log) for n in ("cheap", "twin", "costly"))
    cheap.cost, twin.cost, costly.cost = 6, 7, 13
    done: list[int] = []
    jobs = [(cheap, "train", 4), (twin, "train", 4), (costly, "train", 4)]
    compile_programs(jobs, 1, done=lambda i, s: done.append(i))
    lowered = [name for kind, name in log if kind == "lower"]
    started = [name for kind, name in log if kind == "start"]
    assert lowered == started == ["costly", "twin", "cheap"]
    assert done == [0, 1, 2]  # still told in job order
    assert cheap.fingerprints == {("train", 4): fingerprint(_Lowered("cheap", [], cheap))}


def test_a_failing_lowering_reported_is_the_earliest_in_job_order() -> None:
    """Lowered costliest first, a failure is still the one a user would meet first in study
    order: after a failed lowering, the jobs before it in job order are lowered (one may
    fail too), the ones after it are not."""
    log: list[tuple[str, str]] = []
    early, costly, late = (_Program(n, n, log) for n in ("early", "costly", "late"))
    costly.cost = 10
    early.lower_error = KeyError("early lowering failed")
    costly.lower_error = ValueError("costly lowering failed")
    jobs = [(early, "train", 4), (costly, "train", 4), (late, "train", 4)]
    with pytest.raises(KeyError, match="early lowering failed"):
        compile_programs(jobs, 2)
    assert [name for kind, name in log if kind == "lower"] == ["costly", "early"]
    assert late.lowered == 0


def test_a_cancelled_prefetch_starts_nothing_more() -> None:
    log: list[tuple[str, str]] = []
    held, later = _Program("held", "X", log), _Program("later", "Y", log)
    held.release = threading.Event()
    prefetch = Prefetch([(held, "init", 3), (later, "init", 3)], 1)
    _wait_for(lambda: ("start", "held") in log)
    prefetch.cancel()
    held.release.set()
    prefetch.wait()
    assert ("start", "later") not in log  # queued behind the one worker: dropped
    assert held.adopted == {("init", 3): "executable of held"}
    assert later.adopted == {}  # left to compile when first used


def test_a_failing_prefetch_is_silent_and_leaves_the_program_to_its_user() -> None:
    log: list[tuple[str, str]] = []
    bad = _Program("bad", "X", log)
    bad.compile_error = ValueError("reported where it is used")
    prefetch = Prefetch([(bad, "trajectory", 3)], 2)
    prefetch.wait()
    assert bad.adopted == {}


def test_an_identity_layer_lowers_to_the_same_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flagship's point, seen by the compiler: Activation('linear') adds nothing, so
    ``plain`` and ``plain_identity`` are one program (one compile, then a cache hit); BN is
    another. Their executables give the same bits as compiling each on its own."""
    monkeypatch.setenv("ABLAB_COMPILATION_CACHE", str(tmp_path / "cache"))
    text = TINY_STUDY.replace(
        "[variants.bn]",
        '[variants.plain_identity]\nlayers = [{ layer = "Dense", units = 8 }, '
        '{ layer = "Activation", activation = "linear" }, { layer = "Dense", units = 12 }]\n'
        "[variants.bn]",
    )
    path = tmp_path / "twins.toml"
    path.write_text(text)
    study = ablab.load_study(path)
    programs = {v: build_program(study, v) for v in ("plain", "plain_identity", "bn")}
    prints = {v: fingerprint(p.lower("train", 4)) for v, p in programs.items()}
    assert prints["plain"] is not None
    assert prints["plain"] == prints["plain_identity"] != prints["bn"]
    compile_programs([(p, "train", 4) for p in programs.values()], 2)
    seeds = np.arange(4, dtype=np.uint32)
    for v, program in programs.items():
        assert program.has_executable("train", 4)
        alone = build_program(study, v)  # compiled lazily, on its own
        got, want = program.train(seeds), alone.train(seeds)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_lowering_runs_at_most_one_program_ahead_of_the_compiles() -> None:
    """A lowered program holds its whole module: a study of many variants does not hold them
    all at once (workers + 1 at most)."""
    log: list[tuple[str, str]] = []
    held = _Program("held", "A", log)
    held.release = threading.Event()
    rest = [_Program(f"p{i}", f"B{i}", log) for i in range(3)]
    jobs = [(p, "train", 4) for p in (held, *rest)]
    worker = threading.Thread(target=compile_programs, args=(jobs, 1))
    worker.start()
    _wait_for(lambda: ("start", "held") in log and rest[0].lowered == 1)
    time.sleep(0.2)  # (a scheduling bug would lower more meanwhile)
    assert [p.lowered for p in rest] == [1, 0, 0]
    held.release.set()
    worker.join(WAIT_S)
    assert not worker.is_alive() and all(p.adopted for p in rest)


def test_an_interrupted_call_starts_no_twin_and_logs_no_callback_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[tuple[str, str]] = []
    first, held, twin = (
        _Program(n, t, log) for n, t in [("first", "F"), ("held", "X"), ("twin", "X")]
    )
    held.release = threading.Event()

    def interrupt(i: int, seconds: float) -> None:
        _wait_for(lambda: ("start", "held") in log)
        raise KeyboardInterrupt

    jobs = [(first, "train", 4), (held, "train", 4), (twin, "train", 4)]
    with pytest.raises(KeyboardInterrupt):
        compile_programs(jobs, 2, done=interrupt)
    held.release.set()  # what was compiling finishes...
    _wait_for(lambda: ("end", "held") in log)
    time.sleep(0.2)
    assert ("start", "twin") not in log  # ...and its twin never starts
    assert not [r for r in caplog.records if "callback" in r.getMessage()]


def test_a_twin_whose_program_was_cancelled_in_the_queue_never_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An interrupted call cancels what is queued: a queued program's twin, chained behind
    it, must not be submitted by the cancellation (nor log a callback error)."""
    from concurrent.futures import ThreadPoolExecutor

    from ablab.engine.compiling import _after

    pool = ThreadPoolExecutor(max_workers=1)
    busy = threading.Event()
    ran: list[str] = []
    running = pool.submit(busy.wait, WAIT_S)  # the one worker is busy
    prior = pool.submit(ran.append, "prior")  # queued behind it
    stop = threading.Event()
    twin = _after(prior, pool, lambda: ran.append("twin") or 0.0, stop)
    stop.set()  # what compile_programs does on its way out, before cancelling
    for future in (twin, prior, running):
        future.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    busy.set()
    running.result(WAIT_S)
    assert ran == [] and prior.cancelled() and twin.cancelled()
    assert not [r for r in caplog.records if "callback" in r.getMessage()]
