"""How the command line exits: without the interpreter's teardown, but with everything the
teardown would have done that anybody could notice (``cli.main._exit_now``)."""

from __future__ import annotations

import os
import subprocess
import sys

from reconciler.errors import EXIT_BROKEN_PIPE


def run(program: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", program], text=True, timeout=60, check=False, **kwargs
    )


def test_exit_handlers_run_and_buffered_output_arrives_whole() -> None:
    result = run(
        "import atexit, logging, sys\n"
        "from reconciler.cli.main import _exit_now\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "sys.stdout.write('x' * 1_000_000)\n"
        "sys.stderr.write('on stderr')\n"
        "_exit_now(3)\n",
        capture_output=True,
    )
    assert result.returncode == 3
    assert result.stdout == "x" * 1_000_000 + "handler ran\n"
    assert result.stderr == "on stderr"


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    # The writer waits for its stdin to close: by then its reader has gone (`... | head -1`).
    program = (
        "import sys\n"
        "from reconciler.cli.main import _exit_now\n"
        "sys.stdin.read()\n"
        "sys.stdout.write('line\\n')\n"
        "_exit_now(0)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", program],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Buffered, as a command's stdout is in a pipe: the last flush is the one that fails.
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )
    assert writer.stdin is not None
    assert writer.stdout is not None
    assert writer.stderr is not None
    writer.stdout.close()
    writer.stdin.close()
    assert writer.wait(timeout=60) == EXIT_BROKEN_PIPE
    with writer.stderr:
        assert writer.stderr.read() == ""
