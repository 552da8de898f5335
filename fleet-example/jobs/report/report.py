"""A batch job: count the primes below REPORT_LIMIT, print a one-line report, exit 0."""

import os
import time


def primes_below(limit: int) -> int:
    sieve = bytearray([1]) * max(limit, 2)
    sieve[0:2] = b"\x00\x00"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytearray(len(range(n * n, limit, n)))
    return sum(sieve[:limit])


def main() -> None:
    limit = int(os.environ.get("REPORT_LIMIT", "50000"))
    title = os.environ.get("REPORT_TITLE", "report")
    started = time.monotonic()
    count = primes_below(limit)
    elapsed = time.monotonic() - started
    print(f"report: {title}: {count} primes below {limit} ({elapsed:.3f} s)", flush=True)


if __name__ == "__main__":
    main()
