"""How a run reports progress to whoever watches (the CLI's progress bars, tests)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What a run tells whoever is watching (the CLI's progress bars; tests)."""

    def variant_started(self, variant: str, chunks: int, chunk_size: int) -> None: ...
    def compiled(self, variant: str, seconds: float) -> None: ...
    def chunk_done(self, variant: str, chunk: int, seeds: int) -> None: ...

    # optional (see ablab.analysis.checks.CheckProgress): told about the checks after training


class Silent:
    def variant_started(self, variant: str, chunks: int, chunk_size: int) -> None:
        pass

    def compiled(self, variant: str, seconds: float) -> None:
        pass

    def chunk_done(self, variant: str, chunk: int, seeds: int) -> None:
        pass

    def checks_started(self, total: int) -> None:
        pass

    def check_done(self, label: str) -> None:
        pass
