"""DataLoaders whose worker processes decode videos, started so they survive a parent that decoded.

Workers are not forked from the calling process: a process that has decoded with PyAV holds
FFmpeg's thread pools (frame threads, and the slice threads of its scaler), and a forked child
inherits their locks but not their threads. With PyAV 18.1.1 the child's first ``to_ndarray``
then waits forever in ``avpriv_slicethread_free`` (decode a few frames, ``os.fork()``, decode in
the child: it never returns). So workers come from a ``forkserver`` (``spawn`` where the platform
has none): a clean process that never decoded and forks each worker. The server preloads the
dataset's module (torch, PyAV and the library), so each worker starts in milliseconds rather
than importing torch anew. Python 3.14 makes the same choice its default on Linux.
"""

from __future__ import annotations

import multiprocessing
import signal
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def worker_start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn`` (Windows)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def decode_worker_init(_: int) -> None:
    """``worker_init_fn`` of DataLoaders that decode videos: one thread per worker, so decoding
    workers do not fight the model for cores; Ctrl-C is the main process's to handle (it stops the
    workers itself), so a worker never prints a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


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
    return DataLoader(dataset, num_workers=workers, worker_init_fn=decode_worker_init,
                      multiprocessing_context=multiprocessing.get_context(method), **options)
