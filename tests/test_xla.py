"""XLA compiler options (ablab.engine.xla): this jaxlib takes them, and a flag it does not know
falls back to the base options instead of failing every compile."""

from __future__ import annotations

import pytest

from ablab.engine import xla
from ablab.engine.xla import compiler_options


def test_compiler_options_fall_back_when_a_flag_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert compiler_options() == xla.COMPILER_OPTIONS  # this jaxlib takes them all
    bogus = {**xla.COMPILER_OPTIONS, "xla_cpu_no_such_flag_for_ablab": True}
    monkeypatch.setattr(xla, "COMPILER_OPTIONS", bogus)
    compiler_options.cache_clear()
    try:
        assert compiler_options() == xla.BASE_COMPILER_OPTIONS
    finally:
        compiler_options.cache_clear()
