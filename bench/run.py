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

from bench import accounting, audit, dataset_import, engine, gateway, policy, scale, vectorized

BENCHMARKS = {"accounting": accounting.run, "audit": audit.run, "policy": policy.run,
              "gateway": gateway.run, "dataset_import": dataset_import.run,
              "engine": engine.run, "vectorized": vectorized.run, "scale": scale.run}
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


def _sections(text: str) -> dict[str, str]:
    """docs/performance.md's sections by their '## ' heading line (the header is dropped)."""
    parts = ("\n" + text).split("\n## ")[1:]
    return {part.split("\n", 1)[0]: "## " + part.rstrip("\n") + "\n" for part in parts}


def main(argv: list[str]) -> int:
    """Run the named benchmarks (default: all); each section replaces the section with the same
    heading in docs/performance.md and records when and where it was measured, so running one
    benchmark keeps the others' last results."""
    names = argv or list(BENCHMARKS)
    sections = _sections(OUTPUT.read_text()) if OUTPUT.exists() and argv else {}
    for name in names:
        print(f"running benchmark {name} ...", flush=True)
        started, load_before = dt.datetime.now(dt.UTC), os.getloadavg()[0]
        section = BENCHMARKS[name]()
        # The machine is shared: the 1-minute load average says how quiet it was.
        stamp = (f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine()}; load average "
                 f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after.")
        heading, body = section.split("\n", 1)
        sections[heading.removeprefix("## ")] = f"{heading}\n\n{stamp}\n{body}"
    header = ("# Performance\n\nEach section says when and on which machine it was measured; "
              "`make bench` (`python -m bench.run`) runs them all, `python -m bench.run NAME` "
              "one.\n\n")
    OUTPUT.write_text(header + "\n".join(sections.values()))
    print(OUTPUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
