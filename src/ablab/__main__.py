"""``python -m ablab`` is the ``ablab`` command."""

from ablab._cli import run_main

run_main()
