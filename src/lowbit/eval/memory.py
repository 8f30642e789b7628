"""Peak resident memory over a stretch of work, sampled by a background thread."""

from __future__ import annotations

import threading

from .system import rss_bytes


class PeakRSS:
    """with PeakRSS() as p: work()  ->  p.peak_bytes (highest RSS seen), p.added_bytes (peak − RSS at entry)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self):
        self.start_bytes = self.peak_bytes = rss_bytes()
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
