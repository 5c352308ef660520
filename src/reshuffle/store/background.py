"""``Background``: a function run in a thread whose result or error its joiner receives."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Background:
    """Run a function in a thread; ``join`` returns its result or raises its error."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, args=(function,), daemon=True)
        self.thread.start()

    def _work(self, function: Callable[[], object]) -> None:
        try:
            self.result = function()
        except BaseException as error:  # handed to join()
            self.error = error

    def join(self) -> object:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result
