"""The toolkit family adapters are written with: the patch bookkeeping and per-forward state
(:mod:`.state`), forward hooks for columnar ViTs (:mod:`.columnar`), the filled-grid recipe for
attentions that need full grids (:mod:`.filled_grid`) and the video-LLM mechanism that hands the
language model each prompt with its videos pruned (:mod:`.video_tokens`, driven by what a family
declares). Families find tensors and apply indices with these; the algorithm itself lives in
:mod:`staprune.core`."""
