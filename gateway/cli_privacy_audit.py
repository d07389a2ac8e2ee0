"""`fedgate audit-privacy`: empirical canary audit of the engine's DP-FedAvg (owner, local).

Runs :mod:`engine.privacy_audit` in its own process (own session, loopback-only network) and
prints the analytic ε beside the empirical estimate. Exit codes: 0 the estimate is consistent
with the analytic ε, 1 the audit failed (the interval's lower end is above the analytic ε),
2 usage errors.

The run is reproducible: canaries come from --seed and the aggregator's noise from
--noise-seed (both 0 by default); --fresh-noise uses the job's own unseeded noise instead.
--break noise|clipping audits a deliberately broken copy of the mechanism (noise multiplier 0,
or no clipping) against the configured job's analytic ε, to show that the audit catches it;
these switches exist only in this command, never in a job. See docs/privacy-audit.md.

Examples:

    fedgate audit-privacy                      # PASS: exit 0
    fedgate audit-privacy --rounds 30 --canaries 50 --noise-multiplier 1.0 \\
        --clients-per-round 50 --plot audit.png
    fedgate audit-privacy --fresh-noise        # the job's unseeded noise, not reproducible
    fedgate audit-privacy --break noise        # must FAIL: exit 1
    fedgate audit-privacy --break clipping     # must FAIL: exit 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy/scipy/dp-accounting: imported only when the command runs
    from engine.privacy_audit import AuditConfig

EXIT_FAILED = 1


class AuditProcessFailed(RuntimeError):
    """The audit subprocess exited without a result."""


def run_audit_process(config: AuditConfig, *, broken: str | None = None) -> dict[str, Any]:
    """Run the audit in a new session and return its JSON result; kill the whole session
    afterwards (TFF's ``worker_binary`` outlives the audit process otherwise). ``broken``: a
    key of :data:`engine.privacy_audit.BROKEN_MECHANISMS`, or None for the mechanism as
    configured."""
    from engine.privacy_audit import AUDIT_ENTRY

    with tempfile.TemporaryDirectory(prefix="fedgate-audit-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-c", AUDIT_ENTRY, json.dumps(asdict(config)), str(out)]
        if broken is not None:
            argv.append(broken)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        log = Path(tmp) / "stderr"
        # stderr to a file, not a pipe: worker_binary inherits it and would hold a pipe open.
        with log.open("wb") as stderr:
            # argv is this interpreter, a constant entry and our own config: nothing untrusted.
            process = subprocess.Popen(argv, start_new_session=True, env=env,  # noqa: S603
                                       stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                process.wait()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        if process.returncode != 0 or not out.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise AuditProcessFailed(f"audit process exited with {process.returncode}: "
                                     + " | ".join(tail))
        return json.loads(out.read_text())


def cmd_audit_privacy(args: argparse.Namespace) -> int:
    from engine.privacy_audit import AuditConfig

    chosen = {name: getattr(args, name)
              for name in ("rounds", "canaries", "noise_multiplier", "population", "delta", "seed")
              if getattr(args, name) is not None}
    config = AuditConfig(**chosen)
    if args.fresh_noise:
        config = replace(config, noise_seed=None)
    elif args.noise_seed is not None:
        config = replace(config, noise_seed=args.noise_seed)
    if args.clients_per_round is not None:
        if not 0 < args.clients_per_round <= config.population:
            print("--clients-per-round must be in (0, population]", file=sys.stderr)
            return 2
        config = replace(config, sampling_rate=args.clients_per_round / config.population)
    result = run_audit_process(config, broken=args.broken)
    if args.plot:
        Path(args.plot).write_bytes(histogram_png(result["canary_cosines"],
                                                  result["null_cosines"]))
    summary = {k: v for k, v in result.items() if k not in {"canary_cosines", "null_cosines"}}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_report(summary)
    return 0 if result["passed"] else EXIT_FAILED


def _print_report(summary: dict[str, Any]) -> None:
    p = summary["parameters"]
    low, high = summary["empirical_interval"]
    print(f"mechanism:         {summary['mechanism']}")
    print(f"parameters:        q={p['sampling_rate']:g} (≈{p['sampling_rate'] * p['population']:g} "
          f"clients/round of {p['population']}), z={p['noise_multiplier']:g}, "
          f"T={p['rounds']}, δ={p['delta']:g}, clip={p['clip']:g}")
    print(f"canaries:          {p['canaries']} inserted, {p['null_directions']} null directions, "
          f"seed {p['seed']}")
    noise_seed = "" if p["noise_seed"] is None else f", noise seed {p['noise_seed']}"
    print(f"noise:             {summary['noise']}{noise_seed}")
    print(f"analytic ε:        {summary['analytic_epsilon']:.3f}  (ledger RDP accountant)")
    print(f"empirical ε:       {summary['empirical_epsilon']:.3f}  "
          f"({summary['confidence']:.0%} bootstrap interval [{low:.3f}, {high:.3f}], "
          f"μ = {summary['mu']:.3f})")
    print(f"method:            {summary['method']}")
    verdict = ("PASS: empirical estimate consistent with the analytic ε" if summary["passed"]
               else "FAIL: empirical ε significantly above the analytic ε — mechanism leaks "
                    "more than accounted")
    print(verdict)


# ---------------------------------------------------------------------------------------------
# Plot: overlaid histograms as a dependency-free PNG (matplotlib is not a dependency)

_WIDTH, _HEIGHT, _BINS = 640, 320, 48
_NULL_RGB, _CANARY_RGB, _AXIS_RGB = (70, 110, 200), (230, 120, 30), (0, 0, 0)


def histogram_png(canary: Sequence[float], null: Sequence[float]) -> bytes:
    """Density histograms of the canary (orange) and null (blue) cosines on a shared axis;
    overlaps are blended. x spans [min, max] of both samples; a black baseline at the bottom."""
    values = [*canary, *null]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    densities = []
    for sample in (null, canary):
        counts = [0] * _BINS
        for v in sample:
            counts[min(_BINS - 1, int((v - low) / span * _BINS))] += 1
        densities.append([c / len(sample) for c in counts])
    top = max(max(d) for d in densities) or 1.0
    plot_height = _HEIGHT - 20
    rows = []
    for y in range(_HEIGHT):
        row = bytearray(b"\x00")  # PNG filter type 0 (None) for this scanline
        level = (_HEIGHT - 10 - y) / plot_height * top  # density at this pixel row
        for x in range(_WIDTH):
            if y == _HEIGHT - 10:
                row += bytes(_AXIS_RGB)
                continue
            b = min(_BINS - 1, x * _BINS // _WIDTH)
            inside = [0.0 < level <= d[b] for d in densities]
            colours = [c for c, hit in zip((_NULL_RGB, _CANARY_RGB), inside, strict=True) if hit]
            rgb = (tuple(sum(ch) // len(colours) for ch in zip(*colours, strict=True)) if colours
                   else (255, 255, 255))
            row += bytes(rgb)
        rows.append(bytes(row))
    return _png(_WIDTH, _HEIGHT, b"".join(rows))


def _png(width: int, height: int, raw_rgb_scanlines: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw_rgb_scanlines, 9)) + chunk(b"IEND", b""))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit-privacy",
        help="empirical canary audit of DP-FedAvg: analytic vs measured ε (owner, local)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Defaults live in engine.privacy_audit.AuditConfig (T=30, 200 canaries, z=1, 50 of 500
    # clients per round, δ=1e-5, seeds 0); None here means "the default".
    p.add_argument("--rounds", type=int, help="T (default 30)")
    p.add_argument("--canaries", type=int, help="inserted canary clients (default 200)")
    p.add_argument("--noise-multiplier", type=float, help="z (default 1.0)")
    p.add_argument("--clients-per-round", type=float,
                   help="expected clients per round q·N; sets q (default 50)")
    p.add_argument("--population", type=int, help="training users N of the job (default 500)")
    p.add_argument("--delta", type=float, help="δ (default 1e-5)")
    p.add_argument("--seed", type=int, help="seed of canaries and participation (default 0)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise-seed", type=int,
                       help="seed of the aggregator's Gaussian noise (default 0: reproducible)")
    noise.add_argument("--fresh-noise", action="store_true",
                       help="use the job's own unseeded noise generator (not reproducible)")
    p.add_argument("--break", dest="broken", choices=["noise", "clipping"],
                   help="audit a deliberately broken mechanism (noise multiplier 0, or no "
                        "clipping) against the configured job's ε; must FAIL with exit 1")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write canary vs null histograms (PNG)")
    p.set_defaults(func=cmd_audit_privacy)
