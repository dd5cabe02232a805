"""A worker process for the shared-limits tests (run as a script, not collected by pytest).

    python tests/limits_worker.py download BASE_URL LIMITS OUT_DIR COHORT_ID...
    python tests/limits_worker.py hog LIMITS
    python tests/limits_worker.py apply BASE_URL LIMITS COHORT_ID OLD NEW OUT_DIR

LIMITS is a Redis URL or "file:PATH" (shared) or "memory" (this process only). The limits
are the tests' scaled ones: RateWindow(20, 2.0), 3 concurrent. A worker prints "ready", waits
for a line on stdin (so all start together), runs, and prints one JSON line with what it did.
"hog" takes a concurrency slot, prints its lease token and holds it (renewing) until killed.
"apply" diffs OLD and NEW into OUT_DIR, then applies the diff to COHORT_ID, 2 ids a request.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import anyio

import amp_cohorts_async as amp

LIMITS = amp.Limits(max_concurrent_requests=3, cohort_requests=(amp.RateWindow(20, 2.0),),
                    monthly_quota=None)
NAMESPACE = os.environ.get("AMP_TEST_NAMESPACE", "workers")
LEASE_TTL = float(os.environ.get("AMP_TEST_LEASE_TTL", "1.0"))
# The emulator answers a breached window with Retry-After: 60; the contrast run (which breaks
# the limits on purpose) caps that so it does not sit out real minutes.
RETRY_AFTER_CAP = float(os.environ.get("AMP_TEST_RETRY_AFTER_CAP", "120"))


def backend(spec: str) -> amp.LimitsBackend:
    if spec == "memory":
        return amp.InMemoryLimits()
    if spec.startswith("file:"):
        return amp.FileLimits(spec.removeprefix("file:"), lease_ttl=LEASE_TTL)
    from amp_cohorts_async.redis import RedisLimits

    return RedisLimits.from_url(spec, namespace=NAMESPACE, lease_ttl=LEASE_TTL)


async def download(base_url: str, spec: str, out: str, ids: list[str]) -> None:
    async with amp.CohortsClient("test-api-key", "test-secret-key", base_url=base_url,
                                 limits=LIMITS, limits_backend=backend(spec),
                                 poll=amp.PollPolicy(initial_interval=0.2, max_interval=0.5),
                                 retry=amp.RetryPolicy(max_attempts=10,
                                                       max_retry_after=RETRY_AFTER_CAP)) as client:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        outcomes = await client.download_cohorts(ids, out)
        print(json.dumps({"ok": sum(o.ok for o in outcomes),
                          "failed": [str(o.error) for o in outcomes if not o.ok],
                          "leases_lost": client.scheduler.leases_lost,
                          "state_losses": client.scheduler.backend.state_losses}), flush=True)


async def apply(base_url: str, spec: str, cohort_id: str, old: str, new: str, out: str
                ) -> None:
    diff = await amp.diff_members(old, new, out)
    async with amp.CohortsClient("test-api-key", "test-secret-key", base_url=base_url,
                                 limits=amp.Limits(max_ids_per_request=2),
                                 limits_backend=backend(spec),
                                 retry=amp.RetryPolicy(max_attempts=20)) as client:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        result = await client.apply_diff(cohort_id, diff)
        print(json.dumps({"requests": result.requests_sent}), flush=True)


async def hog(spec: str) -> None:
    limits = backend(spec)
    limits.bind(LIMITS, "hog")
    permit = await limits.acquire(amp.PermitRequest(slot=True, cohort=False))
    assert isinstance(permit, amp.Permit), permit
    print(json.dumps({"token": permit.token}), flush=True)
    while True:  # renewing, as a live holder does, until SIGKILL
        await anyio.sleep(LEASE_TTL / 3)
        await limits.renew([permit])


def main() -> None:
    mode = sys.argv[1]
    if mode == "download":
        base_url, spec, out, *ids = sys.argv[2:]
        anyio.run(download, base_url, spec, out or tempfile.mkdtemp(), ids)
    elif mode == "apply":
        anyio.run(apply, *sys.argv[2:8])
    elif mode == "hog":
        anyio.run(hog, sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
