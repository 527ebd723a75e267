"""The one progress-bar helper of the training side (tqdm when installed, a silent stand-in otherwise)."""

from __future__ import annotations

from typing import Optional

# Scoring runs of at least this many pairs show a progress bar when ``progress=None``.
PROGRESS_MIN_PAIRS = 256


class _NullBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, progress: Optional[bool], *, unit: str = "pair", pairs: Optional[int] = None):
    """A ``tqdm`` bar of ``total`` steps when asked, else an object with no-op ``update``/``close``.

    ``progress=None`` shows the bar when the run scores at least ``PROGRESS_MIN_PAIRS`` pairs
    (``pairs``, default ``total``); True / False force it on / off.
    """
    show = (pairs if pairs is not None else total) >= PROGRESS_MIN_PAIRS if progress is None else bool(progress)
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit, leave=False)
        except ImportError:
            pass
    return _NullBar()
