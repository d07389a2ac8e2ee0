"""The gateway benchmark's baseline: a bare Starlette endpoint that does nothing.

``python -m bench.bare_server PORT`` serves it on loopback with the same uvicorn call
(``uvicorn.run(app, host=..., port=..., log_level=...)``, default loop, HTTP parser and
one worker) that ``fedgate serve`` uses (``gateway.cli.cmd_serve``). Every path answers
204 with no body and reads nothing; ``/healthz`` answers 200 for the readiness check.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def healthz(request: Request) -> Response:
    return Response(status_code=200)


async def nothing(request: Request) -> Response:
    return Response(status_code=204)


app = Starlette(routes=[Route("/healthz", healthz),
                        Route("/{path:path}", nothing, methods=["GET", "POST"])])


def main(argv: list[str]) -> int:
    uvicorn.run(app, host="127.0.0.1", port=int(argv[0]), log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
