"""The toolkit family adapters are written with: the patch bookkeeping and per-forward state
(:mod:`.state`), forward hooks for columnar ViTs (:mod:`.columnar`) and the filled-grid recipe for
attentions that need full grids (:mod:`.filled_grid`). Families find tensors and apply indices with
these; the algorithm itself lives in :mod:`staprune.core`."""
