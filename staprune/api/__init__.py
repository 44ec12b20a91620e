"""The public library, re-exported by :mod:`staprune`: patching (:mod:`.patching`), the one loader
(:mod:`.loading`), named models (:mod:`.models`), FLOPs (:mod:`.flops`), the pruning setting
(:mod:`.settings`) and evaluation as functions (:mod:`.evaluation`)."""
