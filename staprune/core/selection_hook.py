"""The seam through which measurements see the pruning methods' selection.

The selection functions (:func:`staprune.core.score.sta_keep_indices`,
:func:`staprune.core.baselines.random_keep_indices`, :func:`staprune.core.baselines.tome_merge`) are
declared with :func:`selection_function`: each call goes through the wrappers that
:func:`wrapping_selection` has installed, or straight to the function when none is. Adapters and
families call them as plain functions; the FLOP counter (:func:`staprune.core.flops.measure_flops`)
and the timing (:mod:`staprune.runs.timing`) attribute their cost by wrapping them here, so nothing
replaces another module's attributes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

# The functions declared with selection_function, in declaration order.
SELECTED: list[Callable] = []

# While wrapping_selection is active: function -> what a call runs instead (empty: plain calls).
_active: dict[Callable, Callable] = {}
_wrappers: list[Callable[[Callable], Callable]] = []


def selection_function(fn: Callable) -> Callable:
    """Declare ``fn`` a selection function: its calls go through :func:`wrapping_selection`'s wrappers."""
    SELECTED.append(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _active:  # empty unless a measurement runs
            return _active[fn](*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _install() -> None:
    _active.clear()
    for fn in SELECTED if _wrappers else ():
        wrapped = fn
        for wrap in _wrappers:  # the innermost context's wrapper is the outermost call
            wrapped = wrap(wrapped)
        _active[fn] = wrapped


@contextlib.contextmanager
def wrapping_selection(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Run every call of a selection function as ``wrap(function)(...)`` for the duration of the block
    (to attribute FLOPs or time to the selection). ``wrap`` is called once per function on entry (and
    again when a context inside it enters or leaves); contexts nest, each wrapper seeing every call."""
    position = len(_wrappers)
    _wrappers.append(wrap)
    try:
        _install()
        yield
    finally:
        del _wrappers[position]
        _install()


__all__ = ["SELECTED", "selection_function", "wrapping_selection"]
