"""How long the light CLI commands take to answer, and what they import.

``ablab --help``, ``ablab show`` (the run list) and ``ablab query`` must not load Keras, JAX
or matplotlib (tests/test_architecture.py asserts the imports; this measures the time, which
is not a test: the machines are shared and noisy). Each command runs ``--repeats`` times in a
fresh interpreter; the median wall time is reported, with ``python -c pass`` and
``import keras`` from the same run for scale.

The last line printed is JSON: {"python_s", "import_keras_s", "commands": {name: {"median_s",
"heavy_modules"}}}. Usage: python bench/cli_latency.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

PROBE = """
import sys
from ablab.cli import main
main({argv!r})
print("HEAVY", ",".join(sorted(m for m in ("keras", "jax", "matplotlib") if m in sys.modules)))
"""


def _time(code: str, repeats: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        times.append(time.perf_counter() - t0)
        out = res.stdout
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = tempfile.mkdtemp(prefix="ablab-cli-latency-")
    python_s, _ = _time("pass", args.repeats)
    keras_s, _ = _time("import os; os.environ['KERAS_BACKEND']='jax'; import keras", 3)
    commands = {
        "--help": ["--help"],
        "show": ["show", "--runs-dir", runs],
        "query": ["query", "SELECT 1 AS one", "--runs-dir", runs, "--json"],
    }
    doc: dict = {"python_s": python_s, "import_keras_s": keras_s, "commands": {}}
    for name, argv in commands.items():
        median, out = _time(PROBE.format(argv=argv), args.repeats)
        heavy = out.rsplit("HEAVY", 1)[-1].strip()
        doc["commands"][name] = {"median_s": round(median, 3), "heavy_modules": heavy or None}
        print(
            f"ablab {name:7s} {median:6.3f} s  (python alone {python_s:.3f} s)  heavy: "
            f"{heavy or 'none'}"
        )
    print(f"import keras (JAX backend) alone: {keras_s:.3f} s")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
