"""A live progress line (tqdm) that can be switched off for tests and piped output."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from tqdm import tqdm


class Progress:
    """Context manager around a tqdm bar whose total may be learned late; ``update(done, total, **fields)``."""

    def __init__(self, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self._bar: tqdm[Any] | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = tqdm(desc=self.desc, unit=self.unit, dynamic_ncols=True, mininterval=0.5)
        return self

    def update(self, done: int, total: int, **fields: float | int) -> None:
        if self._bar is None:
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in fields.items()},
                              refresh=False)
        self._bar.refresh()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
