"""Scratch fleet repositories for tests and benchmarks: real git repositories in temporary
directories, edited and committed with the git command line (never with the project's own
``reconciler.source``, which is what many of them test)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
FLEET_EXAMPLE = PROJECT / "fleet-example"


class FleetRepo:
    """A git repository in a (created if missing) directory, with helpers to edit and commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "operator@example.invalid")
        self.git("config", "user.name", "Operator")
        self.git("config", "commit.gpgsign", "false")

    @classmethod
    def create(cls, path: Path, files: Mapping[str, str], message: str = "fleet") -> FleetRepo:
        """A repository at ``path`` holding ``files`` (relative path -> text), committed once."""
        repo = cls(path)
        for relative, text in files.items():
            repo.write(relative, text)
        repo.commit(message)
        return repo

    @classmethod
    def of_fleet_example(cls, path: Path) -> FleetRepo:
        """A copy of fleet-example/ at the root of a new repository, committed once."""
        shutil.copytree(FLEET_EXAMPLE, path)
        repo = cls(path)
        repo.commit("fleet-example")
        return repo

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    def write(self, relative: str, text: str) -> Path:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text()

    def edit(self, relative: str, old: str, new: str) -> None:
        text = self.read(relative)
        assert old in text, f"{old!r} not in {relative}"
        self.write(relative, text.replace(old, new, 1))

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")
