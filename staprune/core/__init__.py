"""The method itself, independent of any model: the pruning configuration and its stage plans
(:mod:`.config`), STA's score and selection as tensor functions (:mod:`.score`), the baselines
(:mod:`.baselines`), the video-token methods of video LLMs as a registry (:mod:`.video_methods`),
FLOP-counting primitives (:mod:`.flops`), the seam selection is timed through
(:mod:`.selection_hook`) and staprune's error types (:mod:`.errors`). Imports nothing else of
staprune."""
