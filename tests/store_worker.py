"""A worker process for the directory-store and sync tests (a script, not collected by pytest).

    python tests/store_worker.py download BASE_URL OUT_DIR COHORT_ID...
    python tests/store_worker.py sync BASE_URL OUT_DIR COHORT_ID...

The limits are relaxed (the emulator is given the same ones): what is under test is the shared
directory, not the rate windows. A worker prints "ready", waits for a line on stdin (so all
start together), runs, and prints one JSON line with what it did.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

import amp_cohorts_async as amp

# AMP_TEST_RATE=N: at most N cohort requests a second (to stretch a run for a kill test).
RATE = int(os.environ.get("AMP_TEST_RATE", "1000"))
LIMITS = amp.Limits(max_concurrent_requests=5, cohort_requests=(amp.RateWindow(RATE, 1.0),),
                    monthly_quota=None)


def client(base_url: str) -> amp.CohortsClient:
    return amp.CohortsClient("test-api-key", "test-secret-key", base_url=base_url,
                             limits=LIMITS,
                             poll=amp.PollPolicy(initial_interval=0.05, max_interval=0.2))


async def run(mode: str, base_url: str, out: str, ids: list[str]) -> None:
    async with client(base_url) as amplitude:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        if mode == "download":
            outcomes = await amplitude.download_cohorts(ids, out)
            print(json.dumps({"ok": sum(o.ok for o in outcomes),
                              "failed": [str(o.error) for o in outcomes if not o.ok]}),
                  flush=True)
        else:
            report = await amplitude.sync_cohorts(ids, out)
            print(json.dumps({"actions": {e.cohort_id: e.action for e in report.entries},
                              "errors": [str(e.error) for e in report.entries if e.error],
                              "spent": report.requests_spent}), flush=True)


def main() -> None:
    mode, base_url, out, *ids = sys.argv[1:]
    if mode not in ("download", "sync"):
        sys.exit(__doc__)
    anyio.run(run, mode, base_url, out, ids)


if __name__ == "__main__":
    main()
