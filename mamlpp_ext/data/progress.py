"""A progress bar on stderr for long data work (decoding, downloading)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain line every few seconds.
    ``total`` may be None (unknown); ``unit="B"`` counts bytes (shown as kB, MB, ...)."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "img", leave: bool = False):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                                 unit_divisor=1024 if unit == "B" else 1000, file=sys.stderr, leave=leave)
            except ImportError:
                print(f"{desc}: 0/{total}", file=sys.stderr, flush=True)

    def update(self, k: int) -> None:
        self.done += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.monotonic()
        if now - self._last >= 2.0 or (self.total is not None and self.done >= self.total):
            self._last = now
            print(f"{self.desc}: {self.done}/{self.total} ({now - self._t0:.1f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
