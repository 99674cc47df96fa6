"""The engine: a user's Keras model trained over many seeds at once (JAX ``vmap`` over seeds,
``lax.scan`` over steps), and ``model.fit`` as the reference.

Owns: data and ``fit``'s split (``data``), model preparation (``model``), per-seed initial
state (``initial_state``), probes (``probes``), the compiled per-variant program
(``program``) and the lowerings it traces with (``lowering``), building it from a study
(``build``), chunk and worker sizing (``sizing``), XLA options (``xla``), the reference
``model.fit`` engine (``reference``) and the ``model.fit`` worker run in a fresh interpreter
per Keras backend (``fit_worker``).
May import: ``ablab._keras`` (every Keras internal), ``ablab.errors``, ``ablab.study``,
``ablab.store``.
"""

from ablab.engine import lowering
from ablab.engine.xla import use_persistent_cache

use_persistent_cache()  # before any compilation: JAX settles on its cache at the first one

lowering.install()  # conv / pooling lowerings, active only while the engine traces
