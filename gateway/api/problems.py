"""The node's problem+json response: a ``Problem`` (``gateway.protocol.problems``) as HTTP."""

from __future__ import annotations

import json

from starlette.responses import Response

from gateway.protocol.problems import PROBLEM_CONTENT_TYPE, Problem


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(problem.to_dict()),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )
