"""Counting a local model's forward passes: long prompt pieces run through transformers' forward (a hook on its
decoder sees them, with or without the output head), decode steps and short pieces through the C++ step of
``decode_step.py`` where int8 runs on a CPU (which no module hook sees), so both are counted."""

from __future__ import annotations

from collections.abc import Callable


class Counting:
    """``calls`` gets an entry (from ``stamp()``) per forward pass until ``remove()``."""

    def __init__(self, model, stamp: Callable = lambda: 1):
        self.calls: list = []
        self._hook = model.model.base_model.register_forward_hook(lambda *args: self.calls.append(stamp()))
        self._step = model.engine.runner.step
        self._native = getattr(self._step, "native", None)
        if self._native is not None:
            native, *rest = self._native

            def counted(*args):
                self.calls.append(stamp())
                return native(*args)

            self._step.native = (counted, *rest)

    def remove(self) -> None:
        self._hook.remove()
        if self._native is not None:
            self._step.native = self._native


def count_forwards(model, stamp: Callable = lambda: 1) -> tuple[list, Counting]:
    counting = Counting(model, stamp)
    return counting.calls, counting
