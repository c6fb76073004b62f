"""A progress display that appears only for compiles longer than a second."""
from __future__ import annotations

import sys
import threading
import time

__all__ = ["StageProgress"]


class StageProgress:
    """Context manager: ``with StageProgress(enabled) as p: p.stage("fusion")``.

    The display starts after ``delay`` seconds, so fast compiles print nothing; when stderr is not a
    terminal, one line per stage is printed instead of a live bar.
    """

    def __init__(self, enabled: bool, title: str = "kiln compile", delay: float = 1.0):
        self.enabled, self.title, self.delay = enabled, title, delay
        self._live = None
        self._current = "start"
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._tty = sys.stderr.isatty()

    def __enter__(self):
        self._t0 = time.perf_counter()
        if self.enabled:
            self._timer = threading.Timer(self.delay, self._show)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _show(self):
        with self._lock:
            if not self._tty:
                self._shown_plain = True
                print(f"[{self.title}] {self._current} ...", file=sys.stderr, flush=True)
                return
            from rich.console import Console
            from rich.status import Status
            self._live = Status(self._label(), console=Console(stderr=True))
            self._live.start()

    def _label(self) -> str:
        return f"{self.title}: {self._current} ({time.perf_counter() - self._t0:.1f}s)"

    def stage(self, name: str) -> None:
        with self._lock:
            self._current = name
            if self._live is not None:
                self._live.update(self._label())
            elif getattr(self, "_shown_plain", False):
                print(f"[{self.title}] {name} ... ({time.perf_counter() - self._t0:.1f}s)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
        return False
