"""What staprune reads and writes on disk, below every other layer but the core: state-dict files
read safely and verified (:mod:`.state_dicts`), output paths checked before any work
(:mod:`.outputs`), and the run-folder formats every long command shares (:mod:`.runfolder`)."""
