"""DataLoaders whose worker processes decode videos, started so they survive a parent that decoded.

Workers are not forked from the calling process: a process that has decoded with PyAV holds
FFmpeg's thread pools (frame threads, and the slice threads of its scaler), and a forked child
inherits their locks but not their threads. With PyAV 18.1.1 the child's first ``to_ndarray``
then waits forever in ``avpriv_slicethread_free`` (decode a few frames, ``os.fork()``, decode in
the child: it never returns). So workers come from a ``forkserver`` (``spawn`` where the platform
has none): a clean process that never decoded and forks each worker. The server preloads the
dataset's module (torch, PyAV and the library), so each worker starts in milliseconds rather
than importing torch anew. Python 3.14 makes the same choice its default on Linux.

A worker outlives no one: torch's workers watch their parent process, which for a forkserver
worker is the server, not the process that reads the batches. If that process is killed (``kill
-9``, the OOM killer), its workers would wait forever on their queues and keep the server (whose
pipe they inherited) alive with them, each holding a copy of torch. So each worker also watches
the process that started the loader and exits when it is gone.

Ctrl-C stays this process's to handle, as with forked workers: the server starts with it ignored
(and so does every worker it forks), and a Ctrl-C while workers start is delivered once they are
up, so :func:`loading` always stops them cleanly, without a traceback from any of them.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def worker_start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn`` (Windows)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


WATCH_INTERVAL_S = 1.0  # how often a worker checks that the process that started it is alive


def decode_worker_init(_: int, main_pid: int | None = None) -> None:
    """``worker_init_fn`` of DataLoaders that decode videos: one thread per worker, so decoding
    workers do not fight the model for cores; Ctrl-C is the main process's to handle (it stops the
    workers itself), so a worker never prints a traceback of its own; and with ``main_pid`` (the
    process that reads the batches) the worker exits once that process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if main_pid is not None:
        threading.Thread(target=_exit_without, args=(main_pid,), daemon=True, name="staprune-watch").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's (a reused pid): not ours, but alive
        return True
    return True


def _exit_without(main_pid: int) -> None:
    """Exit this worker at once when ``main_pid`` has gone (nothing is left to read its batches)."""
    while _alive(main_pid):
        time.sleep(WATCH_INTERVAL_S)
    os._exit(0)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there can signal handlers change


def _start_forkserver() -> None:
    """Start the server with Ctrl-C ignored. An ignored signal stays ignored through exec, so the server
    (which imports torch first, for seconds) and every worker it forks never die of a Ctrl-C meant
    for this process, half-started and with a traceback; this process stops its workers itself."""
    from multiprocessing import forkserver

    if not _on_main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()  # returns once the server is spawned, not once it has imported
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back while the workers start and deliver it once they are up: interrupted
    half-way, torch's DataLoader leaves started workers with no one to stop them."""
    if not _on_main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def loading(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """Iterate ``loader`` with its workers started whole and joined when the block ends, however it
    ends: on Ctrl-C this process would otherwise exit while a worker is still starting, which then
    finds its queues gone and prints a traceback of its own."""
    iterator = None
    try:
        with _ctrl_c_deferred():
            iterator = iter(loader)
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own clean stop of its workers
        if shutdown is not None:
            shutdown()


def decoding_loader(dataset: Dataset, workers: int, **options: Any) -> DataLoader:
    """A DataLoader over ``dataset`` whose ``workers`` processes (0: decode in this process) are
    safe to start after this process decoded videos (module docstring).

    Args:
        dataset: must pickle (its class importable by module path): workers receive a copy.
        workers: worker processes; 0 loads in the calling process.
        options: any other DataLoader argument (batch_size, sampler, ...).
    """
    if workers <= 0:
        return DataLoader(dataset, num_workers=0, **options)
    method = worker_start_method()
    if method == "forkserver":
        # Only takes effect before the server first starts; later loaders reuse the running server.
        # A dataset defined in a script (__main__) is imported by each worker anyway, as with spawn.
        preload = ["torch", "av", type(dataset).__module__]
        multiprocessing.set_forkserver_preload([m for m in preload if m != "__main__"])
        _start_forkserver()
    init = functools.partial(decode_worker_init, main_pid=os.getpid())
    return DataLoader(dataset, num_workers=workers, worker_init_fn=init,
                      multiprocessing_context=multiprocessing.get_context(method), **options)
