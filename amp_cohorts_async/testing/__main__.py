"""python -m amp_cohorts_async.testing: FakeAmplitude as a standalone loopback server.

Point any client (amp-cohorts, curl, another language) at the printed base URL with the
printed API key and secret key. The emulator enforces Amplitude's real limits (5 concurrent
requests, 4 cohort requests per minute and 60 per 10 minutes, 500 a month, 100,000 ids per
request, 2M members per cohort) and records every breach; --time-scale 0.05 shrinks the rate
windows twenty-fold for quick experiments (amp-cohorts takes the same --time-scale; a client
of the library uses ``Limits().time_scaled(0.05)``).

On its API port it also answers, without authentication (see ``testing/_control.py``):
  GET  /_emulator/violations          the limit breaches so far (JSON list)
  GET  /_emulator/log                 the requests so far, secrets masked (JSON list)
  POST /_emulator/reset               clear the log, the violations and the usage
  POST /_emulator/cohorts             add a cohort: {"id", "size", "properties", "last_computed"}
  POST /_emulator/usage               {"usage": N}: cohort requests already spent this month
  POST /_emulator/cohorts/ID/touch    recompute a cohort: new members, a later last_computed
When it stops (Ctrl-C, SIGTERM) it prints the violations.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .._config import Limits
from ._fake import FakeAmplitude


def _cohort(spec: str) -> tuple[str, int, tuple[str, ...]]:
    """``ID:SIZE[:prop,prop]``"""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"expected ID:SIZE[:prop,prop], got {spec!r}")
    props = tuple(p for p in parts[2].split(",") if p) if len(parts) > 2 else ()
    return parts[0], int(parts[1]), props


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amp_cohorts_async.testing", description=__doc__,
        formatter_class=_Formatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0,
                        help="port of the Amplitude API (0: any free port)")
    parser.add_argument("--s3-port", type=int, default=0,
                        help="port of the S3 stand-in that large exports redirect to")
    parser.add_argument("--cohort", type=_cohort, action="append", default=[],
                        metavar="ID:SIZE[:PROPS]",
                        help="add a cohort of SIZE generated members, with user property "
                             "columns PROPS (comma-separated); repeatable "
                             "(default: demo:1000:city%(default).0s)")
    parser.add_argument("--job-seconds", type=float, default=2.0,
                        help="how long each export job takes")
    parser.add_argument("--inline-threshold", type=int, default=64 * 1024,
                        help="exports larger than this many bytes redirect to the S3 stand-in")
    parser.add_argument("--gzip", action="store_true", help="serve exports gzip-encoded")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply the cohort-request rate windows by this")
    parser.add_argument("--api-key", default="test-api-key", help="the API key it accepts")
    parser.add_argument("--secret-key", default="test-secret-key",
                        help="the secret key it accepts")
    parser.add_argument("--write-seconds", type=float, default=0.0,
                        help="how long a write holds its cohort (a second write meanwhile "
                        "gets 429)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated members")
    args = parser.parse_args(argv)
    if not args.time_scale > 0:
        parser.error("--time-scale must be > 0")
    limit = Limits().max_cohort_size
    for cohort_id, size, _props in args.cohort:
        if size > limit:
            parser.error(f"cohort {cohort_id} has {size:,} members; Amplitude exports at most "
                         f"{limit:,} (it could never be downloaded)")
    return args


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the description as written."""


async def run(args: argparse.Namespace) -> None:
    limits = Limits().time_scaled(args.time_scale)
    with FakeAmplitude(api_key=args.api_key, secret_key=args.secret_key, limits=limits,
                       job_duration=args.job_seconds, inline_threshold=args.inline_threshold,
                       gzip=args.gzip, seed=args.seed,
                       write_duration=args.write_seconds) as fake:
        for cohort_id, size, props in args.cohort or [("demo", 1000, ("city",))]:
            fake.add_cohort(cohort_id, size=size, properties=props)
        async with fake.serve(args.host, args.port, args.s3_port) as base_url:
            print(f"FakeAmplitude listening on {base_url}", flush=True)
            print(f"S3 stand-in on {fake.s3_origin}", flush=True)
            print(f"API key: {args.api_key}  secret key: {args.secret_key}", flush=True)
            print("limits: " + ", ".join(f"{w.max_requests} cohort requests per {w.seconds:g}s"
                                         for w in limits.cohort_requests)
                  + f", {limits.max_concurrent_requests} concurrent (Amplitude's; scale the "
                  "windows with --time-scale, and run amp-cohorts with the same "
                  "--time-scale)", flush=True)
            print(f"inspect and steer it: GET {base_url}/_emulator/violations, "
                  f"GET {base_url}/_emulator/log, POST {base_url}/_emulator/reset (see "
                  "--help); Ctrl-C stops it and prints the violations", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            try:
                await stop.wait()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
        report_violations(fake)


def report_violations(fake: FakeAmplitude) -> None:
    """What the clients did wrong while it ran: the last thing it says."""
    requests = sum(1 for entry in fake.log if entry.host == "amplitude")
    if not fake.violations:
        print(f"stopped: {requests} API requests, 0 limit violations", flush=True)
        return
    print(f"stopped: {requests} API requests, {len(fake.violations)} limit violations:",
          flush=True)
    for violation in fake.violations:
        print(f"  at {violation.time:.3f}s: {violation.kind}: {violation.detail}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:  # before the signal handlers were in place
        sys.exit(0)


if __name__ == "__main__":
    main()
