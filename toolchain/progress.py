"""Signs of life for long work: progress bars on a terminal, periodic lines elsewhere.

A build often runs where nobody sees a terminal (nohup, Slurm, CI, a PACS server's
scheduler). There a tqdm bar is either hidden or a wall of carriage returns, so:

- ``policy.bar(total, desc)`` is a tqdm bar on a terminal, and elsewhere a counter that
  prints one line at most every ``interval_s`` seconds (and one when it finishes);
- ``policy.heartbeat(desc)`` wraps a call that reports no progress of its own (a
  library's calibration, say) and prints "still running" every ``interval_s`` seconds;
- ``StageTimer`` prints a line when a stage starts and ends and keeps each stage's wall
  time: the one definition of per-stage times, used by the build and the export.

``progress=true`` forces bars, ``false`` turns bars and periodic lines off (stage lines
stay: they are part of the log), ``auto`` picks by whether stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class LineProgress:
    """A progress counter that prints a line at most every `interval_s` seconds.

    Has the parts of tqdm's interface the toolchain uses (update, set_postfix, close,
    context manager, iteration over `iterable`), so callers do not care which they got.
    """

    def __init__(self, total: int | None, desc: str, unit: str, interval_s: float,
                 write: Callable[[str], None] = _stderr_line, iterable=None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.iterable, self.write, self.clock = iterable, write, clock
        self.count = 0
        self.postfix = ""
        self.started = self.last_line = clock()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self.write(self._line(now))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.started
        if elapsed >= self.interval_s:  # short work needs no closing line; the stage line says it ended
            self.write(f"{self.desc}: done, {self.count} {self.unit} in {_duration(elapsed)}")

    def _line(self, now: float) -> str:
        elapsed = now - self.started
        done = f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"
        parts = [done]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.0f}%)"
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and self.count:
            parts.append(f"~{_duration(elapsed * (self.total - self.count) / self.count)} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)


class _Silent(LineProgress):
    def update(self, n: int = 1) -> None:
        self.count += n

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class ProgressPolicy:
    """How long work shows it is alive. `mode`: True = bars, False = quiet, None = auto."""

    mode: bool | None = None
    interval_s: float = 30.0
    write: Callable[[str], None] = field(default=_stderr_line, compare=False)

    def uses_bars(self) -> bool:
        return self.mode is True or (self.mode is None and stderr_is_terminal())

    def bar(self, total: int | None = None, desc: str = "", unit: str = "it", iterable=None):
        if self.uses_bars():
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=False)
        if self.mode is False:
            return _Silent(total, desc, unit, self.interval_s, self.write, iterable)
        return LineProgress(total, desc, unit, self.interval_s, self.write, iterable)

    @contextlib.contextmanager
    def heartbeat(self, desc: str) -> Iterator[None]:
        """Print '<desc>: still running, N elapsed' every interval_s while the body runs
        (not on a terminal, where bars show life, and not with progress=false)."""
        if self.mode is False or self.uses_bars():
            yield
            return
        stop = threading.Event()
        started = time.monotonic()

        def beat():
            while not stop.wait(self.interval_s):
                self.write(f"{desc}: still running, {_duration(time.monotonic() - started)} elapsed")

        thread = threading.Thread(target=beat, name=f"heartbeat:{desc}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def as_policy(progress) -> ProgressPolicy:
    """Accept a ProgressPolicy, the config's progress value (auto/true/false) or None."""
    if isinstance(progress, ProgressPolicy):
        return progress
    if progress in (None, "auto"):
        return ProgressPolicy(None)
    return ProgressPolicy(bool(progress))


def policy_from_config(cfg) -> ProgressPolicy:
    mode = None if cfg.progress == "auto" else bool(cfg.progress)
    return ProgressPolicy(mode, float(cfg.progress_interval))


class StageTimer:
    """Logs each stage's start and end and keeps its wall time (seconds, rounded).

        stages = StageTimer(log)
        with stages("training"):
            ...
        stages.seconds  # {"training": 231.9}
    """

    def __init__(self, log: Callable[[str], None] = print, prefix: str = "stage", digits: int = 1):
        self.log, self.prefix, self.digits = log, prefix, digits
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, quiet_start: bool = False) -> Iterator[None]:
        if not quiet_start:
            self.log(f"{self.prefix} {name}: started")
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.seconds[name] = round(time.perf_counter() - started, self.digits)
            self.log(f"{self.prefix} {name}: failed after {_duration(self.seconds[name])}")
            raise
        self.seconds[name] = round(time.perf_counter() - started, self.digits)
        self.log(f"{self.prefix} {name}: done in {self.seconds[name]:.{self.digits}f} s")
