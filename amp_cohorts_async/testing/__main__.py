"""``python -m amp_cohorts_async.testing``: FakeAmplitude as a standalone loopback server.

Point any client (curl, another language) at the printed base URL with the printed keys.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ._fake import FakeAmplitude


def _cohort(spec: str) -> tuple[str, int, tuple[str, ...]]:
    """``ID:SIZE[:prop,prop]``"""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"expected ID:SIZE[:prop,prop], got {spec!r}")
    props = tuple(p for p in parts[2].split(",") if p) if len(parts) > 2 else ()
    return parts[0], int(parts[1]), props


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m amp_cohorts_async.testing",
                                     description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--s3-port", type=int, default=0)
    parser.add_argument("--cohort", type=_cohort, action="append", default=[],
                        metavar="ID:SIZE[:PROPS]", help="add a cohort (repeatable)")
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--inline-threshold", type=int, default=64 * 1024)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--api-key", default="test-api-key")
    parser.add_argument("--secret-key", default="test-secret-key")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    with FakeAmplitude(api_key=args.api_key, secret_key=args.secret_key,
                       job_duration=args.job_seconds, inline_threshold=args.inline_threshold,
                       gzip=args.gzip, seed=args.seed) as fake:
        for cohort_id, size, props in args.cohort or [("demo", 1000, ("city",))]:
            fake.add_cohort(cohort_id, size=size, properties=props)
        async with fake.serve(args.host, args.port, args.s3_port) as base_url:
            print(f"FakeAmplitude listening on {base_url}", flush=True)
            print(f"S3 stand-in on {fake.s3_origin}", flush=True)
            print(f"API key: {args.api_key} (secret key as given)", flush=True)
            await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(run(parse_args(argv)))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
