"""``python -m ablab`` is the ``ablab`` command."""

from ablab.cli import run_main

run_main()
