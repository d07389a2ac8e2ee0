"""Load generator for the gateway benchmark, run as a separate process.

``python -m bench.loadgen REQUESTS.json --count N --max-seconds T --concurrency C``

REQUESTS.json holds ``{"url": ..., "requests": [{"headers": {...}, "body": "..."}, ...]}``:
requests signed in advance by the benchmark, so that no signing (or any other client work
but HTTP) happens while the clock runs. Request ``i`` is ``requests[i % len(requests)]``;
the benchmark sends a signed request at most once to the gateway (``N ≤ len``; a replay
would be refused), and cycles them for the bare baseline, which ignores them.

``C`` threads, each with one keep-alive connection (httpx), POST the requests in order until
``N`` are done or ``T`` seconds have passed; the first ``--warmup`` requests are sent before
the clock starts. Prints one JSON object: requests completed, elapsed seconds, the latency
of each (seconds) and a count of responses by status code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx


def _send(client: httpx.Client, url: str, request: dict[str, Any]) -> int:
    return client.post(url, content=request["body"].encode(), headers=request["headers"]).status_code


def run_load(url: str, requests: list[dict[str, Any]], *, count: int, max_seconds: float,
             concurrency: int, warmup: int) -> dict[str, Any]:
    with httpx.Client(timeout=60.0) as client:
        for i in range(warmup):
            _send(client, url, requests[i % len(requests)])
    indices = itertools.count(warmup)
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    start = time.perf_counter()
    deadline = start + max_seconds

    def worker() -> None:
        with httpx.Client(timeout=60.0) as client:
            while True:
                with lock:
                    i = next(indices)
                if i >= warmup + count or time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                status = _send(client, url, requests[i % len(requests)])
                elapsed = time.perf_counter() - sent
                with lock:
                    latencies.append(elapsed)
                    statuses[status] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"completed": len(latencies), "elapsed": time.perf_counter() - start,
            "latencies": latencies, "statuses": {str(k): v for k, v in statuses.items()}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requests", type=Path)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args(argv)
    document = json.loads(args.requests.read_text())
    result = run_load(document["url"], document["requests"], count=args.count,
                      max_seconds=args.max_seconds, concurrency=args.concurrency,
                      warmup=args.warmup)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
