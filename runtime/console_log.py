"""A VM's console log on the host: bounded by size, read back by position, time or tail.

    guest serial console / process stdout ──append──▶ <vm dir>/console.log
        ──maintain() (every runtime status call: daemon cycle, apply, status, logs)──▶
            console.log.1 … console.log.KEEP   rotated copies, newest first
            console.log.markers                the init's markers of the rotated bytes
            console.index                      (time, stream position) samples
        ──read() / follow()──▶ ``reconciler logs``, ``GET /api/vms/NAME/logs``, status tails

Why copy-truncate: QEMU opens its chardev logfile once, with ``O_APPEND`` (``logappend=on``),
and the process runtime's shell opens the sandbox's output with ``>>``; neither reopens a file,
so renaming ``console.log`` away would leave them writing to the renamed file. Copying the log
and truncating it in place keeps their descriptor valid, and with ``O_APPEND`` their next write
lands at the new end. What the guest writes between the copy and the truncation (microseconds)
is lost, as with logrotate's ``copytruncate``.

Why a host-side index for ``--since``: the log has no time per line. QEMU 7.2's chardev
``logfile`` writes raw bytes (its ``-msg timestamp=on`` stamps QEMU's own messages, not guest
output), the init's markers carry only the guest's monotonic clock, and kernel lines only the
time since boot; workload output carries nothing. So each ``maintain()`` records the stream
position it saw with the host's clock (at most ``MAX_SAMPLES``), and the file's mtime says when
the last byte arrived. ``--since T`` starts at the position of the newest sample taken at or
before ``T``: it never misses a line written after ``T``, and may show lines up to one sampling
interval older (the daemon samples every cycle; ``logs -f`` samples as it follows).

Positions are offsets in the whole console stream of the current boot: ``base`` (the bytes
rotated out of ``console.log`` so far) plus the offset in ``console.log``. A new boot
(``new_boot()``, called by the runtimes before they start a VMM) moves the log to
``previous-console.log`` and starts a new stream. Readers and the rotation exclude each other
with an ``flock`` on ``console.lock``, so a reader never sees a half-rotated log.

Markers of rotated bytes are kept in ``console.log.markers`` (read by ``runtime.console``), so
health and exit codes stay known however much a workload prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.console import MARKER

LOG = "console.log"
PREVIOUS = f"previous-{LOG}"
INDEX = "console.index"
LOCK = "console.lock"
MARKERS = f"{LOG}.markers"

MAX_BYTES = 1 << 20  # console.log is rotated once it is larger than this
KEEP = 3  # rotated files kept: at most about (KEEP + 1) * MAX_BYTES per VM
MAX_SAMPLES = 1000
MAX_MARKER_BYTES = 64 << 10
SAMPLE_REFRESH_SECONDS = 30.0  # a quiet log is sampled again this often (a newer time, same end)
FILE_MODE = 0o600
_CHUNK = 64 << 10


@dataclass(frozen=True)
class RotationPolicy:
    max_bytes: int = MAX_BYTES
    keep: int = KEEP


@dataclass(frozen=True)
class Segment:
    path: Path
    start: int  # stream position of its first byte
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def _lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
    return text.split("\n")


def _write_private(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(staging, path)


class ConsoleLog:
    """The console log of the VM whose directory is ``vm_dir``."""

    def __init__(self, vm_dir: Path, policy: RotationPolicy | None = None) -> None:
        self.vm_dir = vm_dir
        self.path = vm_dir / LOG
        self.policy = policy or RotationPolicy()

    # -- files ----------------------------------------------------------------------------------

    def rotated(self, number: int) -> Path:
        return self.vm_dir / f"{LOG}.{number}"

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        fd = os.open(self.vm_dir / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _index(self) -> dict[str, object]:
        try:
            value = json.loads((self.vm_dir / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _base(self, index: dict[str, object]) -> int:
        base = index.get("base")
        return base if isinstance(base, int) and base >= 0 else 0

    def _samples(self, index: dict[str, object]) -> list[tuple[float, int]]:
        raw = index.get("samples")
        if not isinstance(raw, list):
            return []
        return [
            (float(s[0]), int(s[1]))
            for s in raw
            if isinstance(s, list) and len(s) == 2 and all(isinstance(v, int | float) for v in s)
        ]

    # -- the runtimes' side ---------------------------------------------------------------------

    def new_boot(self, now: float | None = None) -> None:
        """Before a VMM starts: the last boot's log becomes ``previous-console.log`` (its
        rotated parts and markers go), and a new stream starts at position 0."""
        if not self.vm_dir.is_dir():
            return
        with self._locked(fcntl.LOCK_EX):
            if self.path.exists():
                self.path.replace(self.vm_dir / PREVIOUS)
            for stale in self.vm_dir.glob(f"{LOG}.*"):
                stale.unlink(missing_ok=True)
            stamp = time.time() if now is None else now
            _write_private(
                self.vm_dir / INDEX,
                json.dumps({"boot": stamp, "base": 0, "samples": [[stamp, 0]]}).encode(),
            )

    def maintain(self, now: float | None = None) -> bool:
        """Sample the stream's end, and rotate when ``console.log`` is over the limit; True when
        it rotated. Cheap when nothing changed (a ``stat``); never raises for a missing log."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return False
        stamp = time.time() if now is None else now
        index = self._index()
        samples = self._samples(index)
        base = self._base(index)
        quiet = bool(samples) and samples[-1][1] == base + size
        fresh = quiet and stamp - samples[-1][0] < SAMPLE_REFRESH_SECONDS
        if size <= self.policy.max_bytes and fresh:
            return False
        try:
            with self._locked(fcntl.LOCK_EX):
                return self._maintain_locked(stamp)
        except OSError:
            return False  # a VM directory being deleted: nothing to keep

    def _maintain_locked(self, stamp: float) -> bool:
        index = self._index()
        base = self._base(index)
        samples = self._samples(index)
        rotated = False
        with open(self.path, "r+b") as log:
            size = os.fstat(log.fileno()).st_size
            if size > self.policy.max_bytes:
                self._shift()
                copied = self._copy_truncate(log)
                base += copied
                rotated = True
                size = os.fstat(log.fileno()).st_size
        end = base + size
        if len(samples) >= 2 and samples[-1][1] == samples[-2][1] == end:
            samples[-1] = (stamp, end)  # still quiet: only the time moves
        else:
            samples.append((stamp, end))
        if len(samples) > MAX_SAMPLES:
            old, new = samples[: MAX_SAMPLES // 2], samples[MAX_SAMPLES // 2 :]
            samples = old[::2] + new
        index.update({"base": base, "samples": [[t, p] for t, p in samples]})
        _write_private(self.vm_dir / INDEX, json.dumps(index).encode())
        return rotated

    def _shift(self) -> None:
        oldest = self.rotated(self.policy.keep)
        oldest.unlink(missing_ok=True)
        for number in range(self.policy.keep - 1, 0, -1):
            source = self.rotated(number)
            if source.exists():
                source.replace(self.rotated(number + 1))

    def _copy_truncate(self, log: object) -> int:
        assert hasattr(log, "fileno")
        fd = log.fileno()
        target = self.rotated(1)
        staging = target.with_name(f".{target.name}.tmp")
        copied = 0
        markers: list[bytes] = []
        tail = b""
        out_fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            while True:
                chunk = os.pread(fd, _CHUNK, copied)
                if not chunk:
                    break
                os.write(out_fd, chunk)
                copied += len(chunk)
                *complete, tail = (tail + chunk).split(b"\n")
                markers += [line for line in complete if MARKER.encode() in line]
            # The markers of what leaves console.log are saved before it leaves, so a health
            # check reading between the two sees them twice rather than never.
            if tail and MARKER.encode() in tail:
                markers.append(tail)
            if markers:
                self._keep_markers(markers)
            os.ftruncate(fd, 0)
        finally:
            os.close(out_fd)
        staging.replace(target)
        return copied

    def _keep_markers(self, lines: list[bytes]) -> None:
        path = self.vm_dir / MARKERS
        try:
            kept = path.read_bytes()
        except FileNotFoundError:
            kept = b""
        data = kept + b"".join(line.rstrip(b"\r") + b"\n" for line in lines)
        if len(data) > MAX_MARKER_BYTES:
            data = data[-MAX_MARKER_BYTES:]
            data = data[data.find(b"\n") + 1 :]
        _write_private(path, data)

    # -- the readers' side ----------------------------------------------------------------------

    def _segments(self) -> tuple[list[Segment], float]:
        """The retained stream, oldest first, and when its last byte arrived (its mtime)."""
        base = self._base(self._index())
        segments: list[Segment] = []
        try:
            info = self.path.stat()
            current, mtime = info.st_size, info.st_mtime
        except FileNotFoundError:
            current, mtime = 0, 0.0
        start = base
        for number in range(1, self.policy.keep + 1):
            try:
                size = self.rotated(number).stat().st_size
            except FileNotFoundError:
                break
            start -= size
            segments.insert(0, Segment(self.rotated(number), start, size))
        segments.append(Segment(self.path, base, current))
        return segments, mtime

    def position_at(self, when: float) -> int:
        """The stream position from which every byte was written after ``when``."""
        with self._locked(fcntl.LOCK_SH):
            segments, mtime = self._segments()
            samples = self._samples(self._index())
        end = segments[-1].end
        if mtime and mtime <= when:
            return end  # nothing arrived since
        before = [pos for t, pos in samples if t <= when]
        return min(before[-1], end) if before else segments[0].start

    def read_from(self, position: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of the stream from ``position`` (or from the oldest retained
        byte, when that is gone), and the position after them."""
        with self._locked(fcntl.LOCK_SH):
            segments, _ = self._segments()
            position = max(position, segments[0].start)
            data = bytearray()
            for segment in segments:
                if segment.end <= position or len(data) >= limit:
                    continue
                with contextlib.suppress(FileNotFoundError), open(segment.path, "rb") as part:
                    part.seek(position - segment.start)
                    chunk = part.read(min(limit - len(data), segment.end - position))
                    data += chunk
                    position += len(chunk)
        return bytes(data), position

    def end(self) -> int:
        with self._locked(fcntl.LOCK_SH):
            return self._segments()[0][-1].end

    def boot(self) -> float | None:
        value = self._index().get("boot")
        return float(value) if isinstance(value, int | float) else None

    def tail_position(self, lines: int) -> int:
        """The position where the last ``lines`` lines start (a trailing partial line counts)."""
        with self._locked(fcntl.LOCK_SH):
            segments, _ = self._segments()
            end = segments[-1].end
            if lines <= 0:
                return end
            wanted = lines  # the newline just before the first line shown
            found = 0
            for segment in reversed(segments):
                if segment.size == 0:
                    continue
                stop = segment.end
                with open(segment.path, "rb") as part:
                    while stop > segment.start:
                        begin = max(segment.start, stop - _CHUNK)
                        part.seek(begin - segment.start)
                        chunk = part.read(stop - begin)
                        # A final newline ends the last line; it does not start one.
                        upto = len(chunk) - 1 if stop == end and chunk.endswith(b"\n") else None
                        cut = len(chunk) if upto is None else upto
                        while cut > 0:
                            cut = chunk.rfind(b"\n", 0, cut)
                            if cut < 0:
                                break
                            found += 1
                            if found == wanted:
                                return begin + cut + 1
                        stop = begin
            return segments[0].start

    def read(self, *, since: float | None = None, tail: int | None = None) -> list[str]:
        """The retained lines (``since``: written after that time; ``tail``: the last N)."""
        start = self.position_at(since) if since is not None else 0
        if tail is not None:
            start = max(start, self.tail_position(tail))
        data, _ = self.read_from(start, limit=1 << 62)
        lines = _lines(data)
        if lines and lines[-1] == "":
            lines.pop()
        return lines

    def follow(
        self,
        *,
        since: float | None = None,
        tail: int | None = None,
        stop: Callable[[], bool] = lambda: False,
        interval: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[str]:
        """The lines ``read()`` gives, then each new complete line as it arrives, until
        ``stop()``; a new boot starts again from its first line. Samples the index as it goes,
        so ``--since`` gets finer while someone follows."""
        position = self.position_at(since) if since is not None else 0
        if tail is not None:
            position = max(position, self.tail_position(tail))
        boot = self.boot()
        pending = b""
        while not stop():
            data, position = self.read_from(position)
            if data:
                *complete, pending = (pending + data).split(b"\n")
                for line in complete:
                    yield _lines(line)[0]
                continue
            now_boot = self.boot()
            if now_boot != boot:
                boot, position, pending = now_boot, 0, b""
                continue
            self.maintain()
            sleep(interval)
