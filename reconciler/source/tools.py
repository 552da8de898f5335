"""Running git, gpg and ssh-keygen for signature verification, isolated from the user's setup.

Used by ``reconciler.source.gpg``, ``.ssh`` and ``.verifier``. Every tool runs with an
environment of our making: no ``GIT_*`` variable of the caller, no ``GNUPGHOME`` but the one we
give, git's global and system configuration switched off, and the C locale, since the output is
parsed. A tool that is missing, hangs or cannot start is one ``SourceError`` line.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import SourceError

TIMEOUT = 60.0
PACKAGES = {"gpg": "gnupg", "ssh-keygen": "openssh-client", "git": "git"}


def missing(tool: str) -> str:
    return (
        f"{tool} is not installed; install the Debian package {PACKAGES[tool]} "
        "to verify commit signatures"
    )


def last_reason(output: str) -> str:
    """The last ``fatal:``/``error:``/``gpg:`` line of a tool's output, else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("fatal:", "error:", "gpg:"))]
    text = (errors or lines or ["no output"])[-1]
    return text.removeprefix("fatal: ").removeprefix("error: ").removeprefix("gpg: ")


def isolated_env(gnupg_home: Path | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GIT_") and k not in {"GNUPGHOME", "LANGUAGE"}
    }
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        LC_ALL="C",
    )
    if gnupg_home is not None:
        env["GNUPGHOME"] = str(gnupg_home)
    return env


def run(
    argv: list[str],
    *,
    env: dict[str, str],
    stdin: bytes | None = None,
    merge: bool = False,
    cwd: Path | None = None,
) -> tuple[int, str, str]:
    """Run a tool: (exit code, stdout, stderr), stderr folded into stdout with ``merge``."""
    code, out, err = run_bytes(argv, env=env, stdin=stdin, merge=merge, cwd=cwd)
    return code, out.decode(errors="replace"), err


def run_bytes(
    argv: list[str],
    *,
    env: dict[str, str],
    stdin: bytes | None = None,
    merge: bool = False,
    cwd: Path | None = None,
) -> tuple[int, bytes, str]:
    """:func:`run` with stdout as it was written (a commit object need not be UTF-8)."""
    tool = Path(argv[0]).name
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            env=env,
            cwd=cwd,
            timeout=TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise SourceError(missing(tool) if tool in PACKAGES else str(exc)) from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceError(
            f"{tool} gave no answer within {TIMEOUT:g} s while checking a signature"
        ) from exc
    except OSError as exc:
        raise SourceError(f"cannot run {tool}: {exc.strerror or exc}") from exc
    return done.returncode, done.stdout, (done.stderr or b"").decode(errors="replace")


def private_dir(path: Path) -> Path:
    """``path`` created (mode 0700) if missing; ``SourceError`` when it cannot be."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(
            f"cannot create {path} for the trusted keys: {exc.strerror}; "
            "check permissions of the state directory"
        ) from exc
    return path


@dataclass(frozen=True)
class Verdict:
    """What a verdict function decided about one signature: ``good`` with a description of the
    signer, or refused with the one line that says why and what to do. A signature that cannot
    be judged at all (a tool failed) is a ``SourceError`` instead, and is not remembered."""

    good: bool
    message: str
