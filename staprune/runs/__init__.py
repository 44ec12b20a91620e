"""Run machinery the commands share: argument groups (:mod:`.arguments`), devices and number
formats (:mod:`.devices`), torchrun helpers (:mod:`.distributed`), evaluating a setting on a video
list into a resumable run folder (:mod:`.list_evaluation`) and timing configurations side by side
(:mod:`.timing`; a video LLM's prefill and first token: :mod:`.video_llm_timing`)."""
