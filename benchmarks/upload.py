"""Upload benchmark: 2M ids through upload_cohort vs a bare httpx loop posting the same chunks.

FakeAmplitude runs in another process over loopback. Each side runs in a fresh child process
so its peak RSS is its own. Prints wall time ratio (ours / bare) and peak RSS growth.

    python benchmarks/upload.py [--ids N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import subprocess
import sys
import time

import httpx

import amp_cohorts_async as amp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import API_KEY, SECRET_KEY, fake_server, reset_peak_rss, status_kib

CHUNK = 100_000


def ids(n: int) -> list[str]:
    return [f"warehouse-user-{i:09d}" for i in range(n)]


async def ours(base_url: str, n: int) -> float:
    values = ids(n)
    async with amp.CohortsClient(API_KEY, SECRET_KEY, base_url=base_url) as client:
        started = time.perf_counter()
        result = await client.upload_cohort(name="bench", app_id=1, id_type="BY_USER_ID",
                                            ids=values, owner="o@example.com", published=False)
        elapsed = time.perf_counter() - started
    assert result.totals == n, result
    return elapsed


async def bare(base_url: str, n: int) -> float:
    values = ids(n)
    async with httpx.AsyncClient(base_url=base_url, auth=(API_KEY, SECRET_KEY),
                                 timeout=600) as http:
        started = time.perf_counter()
        first = await http.post("/api/3/cohorts/upload", json={
            "name": "bench", "app_id": 1, "id_type": "BY_USER_ID", "ids": values[:CHUNK],
            "owner": "o@example.com", "published": False})
        cohort_id = first.json()["cohortId"]
        for start in range(CHUNK, n, CHUNK):
            response = await http.post("/api/3/cohorts/membership", json={
                "cohort_id": cohort_id, "memberships": [
                    {"ids": values[start:start + CHUNK], "id_type": "BY_NAME",
                     "operation": "ADD"}]})
            response.raise_for_status()
        return time.perf_counter() - started


def child(kind: str, base_url: str, n: int) -> None:
    """Peak RSS growth, read as VmHWM after a reset (ru_maxrss would include the parent's)."""
    reset_peak_rss()
    before = status_kib("VmRSS")
    seconds = asyncio.run((ours if kind == "ours" else bare)(base_url, n))
    peak = status_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "growth": (peak - before) * 1024}))


def run_child(kind: str, base_url: str, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, base_url, str(n)],
                         check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=2_000_000)
    n = parser.parse_args().ids
    results: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
    with fake_server() as base_url:
        for _ in range(2):
            for kind in ("bare", "ours"):
                results[kind].append(run_child(kind, base_url, n))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
    print(f"upload of {n:,} ids in {-(-n // CHUNK)} requests of <= {CHUNK:,}, best of 2:")
    print(f"  upload_cohort {best['ours']['seconds']:.2f}s | bare httpx loop "
          f"{best['bare']['seconds']:.2f}s | ratio ours/bare "
          f"{best['ours']['seconds'] / best['bare']['seconds']:.2f}")
    print(f"  peak RSS growth: ours {best['ours']['growth'] / 2**20:.0f} MiB | bare "
          f"{best['bare']['growth'] / 2**20:.0f} MiB (both hold the {n:,} ids in memory)")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
