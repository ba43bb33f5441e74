"""``backend="apply_async"``: a ``multiprocessing.Pool``, one ``apply_async`` per chunk."""

from __future__ import annotations

from typing import Any

from ._mppool import MPPoolBackend, run_pool_task


class ApplyAsyncBackend(MPPoolBackend):
    """Each chunk is one ``Pool.apply_async`` whose callback reports it."""

    def _start_feeding(self, pool: Any) -> None:
        pass

    def _feed(self, task: tuple[Any, ...]) -> None:
        key = task[0]
        self._pool.apply_async(
            run_pool_task,
            (task,),
            callback=self._on_result,
            error_callback=lambda exc: self._on_task_error(key, exc),
        )

    def _stop_feeding(self) -> None:
        pass
