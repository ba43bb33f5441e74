"""The progress bar: tqdm on stderr, counting items as their chunks complete."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

# What a bar assumes on a terminal that reports a size of 0 x 0 (as `stty
# size` does before anyone sets it): the size terminals open with.
DEFAULT_COLUMNS, DEFAULT_ROWS = 80, 24


def _terminal_size(file: Any) -> tuple[int, int] | None:
    """(columns, rows) of the terminal ``file`` is, or None when it is none."""
    try:
        size = os.get_terminal_size(file.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return size.columns, size.lines


class Progress:
    """A tqdm bar, or nothing when ``option`` is False."""

    def __init__(self, option: bool | Mapping[str, Any], total: int | None) -> None:
        self._bar: Any = None
        if option is False:
            return
        settings: dict[str, Any] = {"total": total, "file": sys.stderr, "unit": "item", "dynamic_ncols": True}
        if isinstance(option, Mapping):
            if "ncols" in option:
                settings["dynamic_ncols"] = False  # tqdm drops a width given with it
            settings.update(option)
        if settings["file"] is None:
            return  # no standard error (descriptor 2 closed): nowhere to draw
        if _terminal_size(settings["file"]) == (0, 0):
            # A terminal that reports no size (a pseudo-terminal nobody
            # sized): tqdm would fit its bar into zero columns and hide it
            # below row zero, drawing nothing at all.
            settings = {"ncols": DEFAULT_COLUMNS, "nrows": DEFAULT_ROWS, **settings, "dynamic_ncols": False}
        # Imported only for a bar: tqdm is most of ``import parmap``'s time
        # (~40 ms) and makes every forked worker's parent bigger (benchmark W4).
        from tqdm import tqdm

        try:
            self._bar = tqdm(**settings)
        except _STREAM_ERRORS:
            self._bar = None

    def update(self, items: int) -> None:
        if self._bar is not None and items:
            try:
                self._bar.update(items)
            except _STREAM_ERRORS:
                self.close()

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            try:
                bar.close()
            except _STREAM_ERRORS:
                pass


# What a stream that cannot be written raises in tqdm (it also flushes
# sys.stdout, closed perhaps): the bar goes, never the work it shows. A
# bad option fails at the call instead (see _options._try_drawing).
_STREAM_ERRORS = (OSError, ValueError, AttributeError)
