"""The progress bar: tqdm on stderr, counting items as their chunks complete."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


class Progress:
    """A tqdm bar, or nothing when ``option`` is False."""

    def __init__(self, option: bool | Mapping[str, Any], total: int | None) -> None:
        self._bar: Any = None
        if option is False:
            return
        settings: dict[str, Any] = {"total": total, "file": sys.stderr, "unit": "item", "dynamic_ncols": True}
        if isinstance(option, Mapping):
            settings.update(option)
        # Imported only for a bar: tqdm is most of ``import parmap``'s time
        # (~40 ms) and makes every forked worker's parent bigger (benchmark W4).
        from tqdm import tqdm

        self._bar = tqdm(**settings)

    def update(self, items: int) -> None:
        if self._bar is not None and items:
            self._bar.update(items)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
