"""`fedgate audit-privacy`: empirical canary audit of the engine's DP-FedAvg (owner, local).

Runs engine.privacy_audit in its own process (own session, loopback-only network) and
prints the analytic ε beside the empirical estimate. Exit codes: 0 every audit run is
consistent with the analytic ε, 1 an audit failed (the interval's lower end is above the
analytic ε), 2 usage errors.

The run is reproducible: canaries come from --seed and the aggregator's noise from
--noise-seed (both 0 by default); --fresh-noise uses the job's own unseeded noise instead.
--seeds N runs N audits in one process (seeds S, S+1, …; noise seeds likewise) and prints one
row each. --path training sends the canaries through the engine's per-user TFF DP-FedAvg
process with real local training beside synthetic users instead of straight into the
aggregator; --path shards through the vectorized engine every job with a vectorizable model
runs (its noise is always fresh, so those runs are not reproducible).
--break noise|half-noise|clipping audits a deliberately broken copy of the mechanism (noise
multiplier 0, noise multiplier halved, or no clipping) against the configured job's analytic
ε, to show that the audit catches it; these switches exist only in this command, never in a
job. See docs/privacy-audit.md.
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

from gateway.cli.usage import add_command, examples

if TYPE_CHECKING:  # numpy/scipy/dp-accounting: imported only when the command runs
    from engine.privacy_audit import AuditConfig

EXAMPLES = examples(
    "fedgate audit-privacy                           # PASS: exit 0",
    "fedgate audit-privacy --seeds 10                # 10 runs, one process: all PASS, exit 0",
    "fedgate audit-privacy --seeds 10 --break half-noise   # must FAIL: exit 1",
    "fedgate audit-privacy --clip 1e-9               # the smallest admissible clip: PASS",
    "fedgate audit-privacy --path training --population 100",
    "fedgate audit-privacy --path shards --population 100 --seeds 10",
    "fedgate audit-privacy --fresh-noise             # the job's unseeded noise, not reproducible",
    "fedgate audit-privacy --break noise --plot audit.png   # must FAIL: exit 1")

# Imports inside the commands, not at the top: `fedgate --help` and the researcher commands
# run on a light install without the node extra (SQLModel, Casbin, Starlette, TensorFlow),
# and each command loads only what it needs.

EXIT_FAILED = 1
BROKEN_CHOICES = ("noise", "half-noise", "clipping")  # engine.privacy_audit.BROKEN_MECHANISMS
PATH_CHOICES = ("aggregator", "training", "shards")  # engine.privacy_audit.AUDIT_PATHS


class AuditProcessFailed(RuntimeError):
    """The audit subprocess exited without a result."""


def run_audits(requests: Sequence[tuple[AuditConfig, str | None]]) -> list[dict[str, Any]]:
    """Run each (config, broken) audit in turn in one new session (TFF starts once) and return
    their JSON results in order; kill the whole session afterwards (TFF's ``worker_binary``
    outlives the audit process otherwise). ``broken``: a key of
    :data:`engine.privacy_audit.BROKEN_MECHANISMS`, or None for the mechanism as configured."""
    from engine.privacy_audit import AUDIT_ENTRY

    batch = [{"config": asdict(config), "broken": broken} for config, broken in requests]
    with tempfile.TemporaryDirectory(prefix="fedgate-audit-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-c", AUDIT_ENTRY, json.dumps(batch), str(out)]
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
              for name in ("rounds", "canaries", "noise_multiplier", "population", "delta",
                           "seed", "clip", "path")
              if getattr(args, name) is not None}
    if chosen.get("path") == "shards":  # the vectorized engine has fresh noise only
        if args.noise_seed is not None:
            print("--path shards draws fresh noise: --noise-seed does not apply", file=sys.stderr)
            return 2
        if args.broken == "clipping":
            print("--path shards has no clipping-removed mechanism", file=sys.stderr)
            return 2
        chosen["noise_seed"] = None
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
    if args.seeds < 1:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    configs = [replace(config, seed=config.seed + i,
                       noise_seed=None if config.noise_seed is None else config.noise_seed + i)
               for i in range(args.seeds)]
    results = run_audits([(c, args.broken) for c in configs])
    if args.plot:
        Path(args.plot).write_bytes(histogram_png(results[0]["canary_cosines"],
                                                  results[0]["null_cosines"]))
    summaries = [{k: v for k, v in result.items() if k not in {"canary_cosines", "null_cosines"}}
                 for result in results]
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2,
                         sort_keys=True))
    elif len(summaries) == 1:
        _print_report(summaries[0])
    else:
        _print_table(summaries)
    return 0 if all(result["passed"] for result in results) else EXIT_FAILED


def _print_parameters(summary: dict[str, Any]) -> None:
    p = summary["parameters"]
    print(f"mechanism:         {summary['mechanism']}")
    print(f"path:              {summary['path']}")
    print(f"parameters:        q={p['sampling_rate']:g} (≈{p['sampling_rate'] * p['population']:g} "
          f"clients/round of {p['population']}), z={p['noise_multiplier']:g}, "
          f"T={p['rounds']}, δ={p['delta']:g}, clip={p['clip']:g}")
    print(f"canaries:          {p['canaries']} inserted, {p['null_directions']} null directions, "
          f"model {p['num_features']}×{p['num_classes']} + bias")
    print(f"analytic ε:        {summary['analytic_epsilon']:.3f}  (ledger RDP accountant)")


def _print_report(summary: dict[str, Any]) -> None:
    p = summary["parameters"]
    low, high = summary["empirical_interval"]
    _print_parameters(summary)
    noise_seed = "" if p["noise_seed"] is None else f", noise seed {p['noise_seed']}"
    print(f"seed:              {p['seed']}; noise {summary['noise']}{noise_seed}")
    print(f"cosines:           canary {summary['canary_cosine_mean']:.5f} ± "
          f"{summary['canary_cosine_std']:.5f}, null {summary['null_cosine_mean']:.5f} ± "
          f"{summary['null_cosine_std']:.5f}")
    print(f"empirical ε:       {summary['empirical_epsilon']:.3f}  "
          f"({summary['confidence']:.0%} bootstrap interval [{low:.3f}, {high:.3f}])")
    print(f"method:            {summary['method']}")
    print(_verdict(summary["passed"]))


def _print_table(summaries: list[dict[str, Any]]) -> None:
    _print_parameters(summaries[0])
    print(f"noise:             {summaries[0]['noise']}")
    print(f"{'seed':>6} {'noise seed':>10} {'empirical ε':>12}  {'interval':<18} verdict")
    for s in summaries:
        p = s["parameters"]
        low, high = s["empirical_interval"]
        noise_seed = "-" if p["noise_seed"] is None else str(p["noise_seed"])
        print(f"{p['seed']:>6} {noise_seed:>10} {s['empirical_epsilon']:>12.3f}  "
              f"[{low:6.3f}, {high:6.3f}]  {'PASS' if s['passed'] else 'FAIL'}")
    passed = sum(s["passed"] for s in summaries)
    print(f"passed {passed} of {len(summaries)}, failed {len(summaries) - passed}")
    print(_verdict(passed == len(summaries)))


def _verdict(passed: bool) -> str:
    return ("PASS: empirical estimate consistent with the analytic ε" if passed
            else "FAIL: empirical ε significantly above the analytic ε — mechanism leaks "
                 "more than accounted")


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
    p = add_command(
        subparsers, "audit-privacy",
        help="empirical canary audit of DP-FedAvg: analytic vs measured ε (owner, local)",
        description=__doc__, examples=EXAMPLES,
    )
    # Defaults live in engine.privacy_audit.AuditConfig (T=30, 1000 canaries, z=1, C=1, 50 of
    # 500 clients per round, δ=1e-5, seeds 0); None here means "the default".
    p.add_argument("--rounds", type=int, help="T (default 30)")
    p.add_argument("--canaries", type=int, help="inserted canary clients (default 1000)")
    p.add_argument("--noise-multiplier", type=float, help="z (default 1.0)")
    p.add_argument("--clip", type=float, help="clip norm C (default 1.0)")
    p.add_argument("--clients-per-round", type=float,
                   help="expected clients per round q·N; sets q (default 50)")
    p.add_argument("--population", type=int,
                   help="training users N of the job (default 500; synthetic users on the "
                        "training path)")
    p.add_argument("--delta", type=float, help="δ (default 1e-5)")
    p.add_argument("--seed", type=int, help="seed of canaries and participation (default 0)")
    p.add_argument("--seeds", type=int, default=1,
                   help="run this many audits, seeds S, S+1, … (noise seeds likewise), in one "
                        "process; print one row each (default 1)")
    p.add_argument("--path", choices=PATH_CHOICES,
                   help="aggregator: canary deltas straight into the engine's aggregator "
                        "(default); training: canary clients trained in the engine's per-user "
                        "TFF process beside synthetic users; shards: canary users trained in "
                        "the vectorized engine jobs run (fresh noise only)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise-seed", type=int,
                       help="seed of the aggregator's Gaussian noise (default 0: reproducible)")
    noise.add_argument("--fresh-noise", action="store_true",
                       help="use the job's own unseeded noise generator (not reproducible)")
    p.add_argument("--break", dest="broken", choices=BROKEN_CHOICES,
                   help="audit a deliberately broken mechanism (noise multiplier 0, noise "
                        "multiplier halved, or no clipping) against the configured job's ε; "
                        "must FAIL with exit 1")
    p.add_argument("--json", action="store_true", help="print the result(s) as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="write canary vs null histograms (PNG) of the first run")
    p.set_defaults(func=cmd_audit_privacy)
