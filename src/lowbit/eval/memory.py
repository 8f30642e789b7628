"""Peak resident memory over a stretch of work, sampled by a background thread."""

from __future__ import annotations

import threading
import time

from .system import rss_bytes


class PeakRSS:
    """with PeakRSS() as p: work()  ->  p.peak_bytes (highest RSS seen), p.added_bytes (peak − RSS at entry),
    p.samples ([(seconds since entry, RSS bytes)], for memory curves)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            now = rss_bytes()
            self.samples.append((time.perf_counter() - self._t0, now))
            self.peak_bytes = max(self.peak_bytes, now)

    def __enter__(self):
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._t0 = time.perf_counter()
        self.samples = [(0.0, self.start_bytes)]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    @property
    def added_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes
