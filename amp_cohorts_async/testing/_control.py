"""The served emulator's own endpoints, ``/_emulator/...``: look inside it and steer it over HTTP.

For tests in other languages and for scripts that drive ``python -m amp_cohorts_async.testing``
from outside: what broke a limit, what was asked, and set-up (cohorts, usage, recomputes)
without Python. No authentication (the emulator listens on loopback); never counted as API
traffic, so they are not in the log, the concurrency count or the violations.

    GET  /_emulator/violations            [{"time", "kind", "detail"}]
    GET  /_emulator/log                   [{"time", "method", "path", "query", "status",
                                            "endpoint", "host", "headers"}], secrets masked
    POST /_emulator/reset                 clears the log, the violations and the usage
    POST /_emulator/cohorts               {"id", "size", "properties", "last_computed"}
    POST /_emulator/usage                 {"usage": N}: this month's cohort requests spent
    POST /_emulator/cohorts/{id}/touch    recompute the cohort (new members, later
                                          last_computed), as Amplitude's schedule does
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import attrs

from ._fake import FakeAmplitude, FakeRequest, FakeResponse, LoggedRequest, Violation

__all__ = ("PREFIX", "answer")

PREFIX = "/_emulator/"
# Query parameters of a presigned URL that carry credentials (the S3 stand-in logs them).
_SECRET_QUERY = {"x-amz-signature", "x-amz-credential", "x-amz-security-token"}


def _json(status: int, data: Any) -> FakeResponse:
    return FakeResponse(status, [("Content-Type", "application/json")],
                        json.dumps(data).encode())


def _refuse(status: int, message: str) -> FakeResponse:
    return _json(status, {"error": {"http_code": status, "type": "emulator", "message": message}})


def violation_record(violation: Violation) -> dict[str, Any]:
    return attrs.asdict(violation)


def _log_record(entry: LoggedRequest) -> dict[str, Any]:
    record = attrs.asdict(entry)
    record["query"] = [[k, "***" if k.lower() in _SECRET_QUERY else v] for k, v in entry.query]
    return record


async def answer(fake: FakeAmplitude, request: FakeRequest) -> FakeResponse:
    """The answer to a request under ``/_emulator/``."""
    route = request.path[len(PREFIX):].strip("/")
    method = request.method
    if method == "GET" and route == "violations":
        return _json(200, [violation_record(v) for v in fake.violations])
    if method == "GET" and route == "log":
        return _json(200, [_log_record(entry) for entry in fake.log])
    if method == "POST" and route == "reset":
        fake.reset()
        return _json(200, {"reset": True})
    if method == "POST" and route in ("cohorts", "usage"):
        try:
            data = json.loads(request.body or b"{}")
        except ValueError:
            return _refuse(400, "the body is not JSON")
        if not isinstance(data, dict):
            return _refuse(400, "the body must be a JSON object")
        return _add_cohort(fake, data) if route == "cohorts" else _set_usage(fake, data)
    parts = route.split("/")
    if method == "POST" and len(parts) == 3 and parts[0] == "cohorts" and parts[2] == "touch":
        cohort_id = unquote(parts[1])
        if cohort_id not in fake.cohorts:
            return _refuse(404, f"no cohort {cohort_id!r}")
        cohort = fake.touch(cohort_id)
        return _json(200, {"id": cohort.id, "size": cohort.size,
                           "last_computed": cohort.last_computed})
    return _refuse(404, f"no emulator endpoint {method} {request.path}")


def _add_cohort(fake: FakeAmplitude, data: dict[str, Any]) -> FakeResponse:
    cohort_id, size = data.get("id"), data.get("size", 10)
    properties = data.get("properties", [])
    last_computed = data.get("last_computed")
    if not isinstance(cohort_id, str) or not cohort_id:
        return _refuse(400, '"id" must be a non-empty string')
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return _refuse(400, '"size" must be an integer >= 0')
    if not isinstance(properties, list) or not all(isinstance(p, str) for p in properties):
        return _refuse(400, '"properties" must be a list of strings')
    if last_computed is not None and (isinstance(last_computed, bool)
                                      or not isinstance(last_computed, int | float)):
        return _refuse(400, '"last_computed" must be epoch seconds')
    cohort = fake.add_cohort(cohort_id, size=size, properties=properties,
                             last_computed=None if last_computed is None else int(last_computed))
    return _json(201, {"id": cohort.id, "size": cohort.size,
                       "last_computed": cohort.last_computed})


def _set_usage(fake: FakeAmplitude, data: dict[str, Any]) -> FakeResponse:
    usage = data.get("usage")
    if isinstance(usage, bool) or not isinstance(usage, int) or usage < 0:
        return _refuse(400, '"usage" must be an integer >= 0')
    fake.set_usage(usage)
    return _json(200, {"usage": usage})
