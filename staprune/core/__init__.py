"""The method itself, independent of any model: the pruning configuration and its stage plans
(:mod:`.config`), STA's score and selection as tensor functions (:mod:`.score`), the baselines
(:mod:`.baselines`), FLOP-counting primitives (:mod:`.flops`) and staprune's error types
(:mod:`.errors`). Imports nothing else of staprune."""
