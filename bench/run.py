"""``make bench``: run the benchmarks and rewrite docs/performance.md.

Each benchmark reports ratios to a baseline measured in the same run, because these
machines are noisy; absolute numbers are for orientation only.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

from bench import accounting, audit, dataset_import, engine, gateway, policy

BENCHMARKS = {"accounting": accounting.run, "audit": audit.run, "policy": policy.run,
              "gateway": gateway.run, "dataset_import": dataset_import.run,
              "engine": engine.run}
OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    sections = []
    for name in names:
        print(f"running benchmark {name} ...", flush=True)
        sections.append(BENCHMARKS[name]())
    header = (
        "# Performance\n\n"
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()} "
        f"with `make bench` (`python -m bench.run {' '.join(names)}`).\n\n"
    )
    OUTPUT.write_text(header + "\n".join(sections))
    print(OUTPUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
