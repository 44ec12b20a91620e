"""The video-LLM families: the kind's shared base (:mod:`.base`), what the Qwen models share
(:mod:`.qwen`), and one module per model family, each registered by one line in
:data:`staprune.families.FAMILY_MODULES`. Sibling families never import each other: what two share
lives in a module below them. docs/families/add-a-video-llm.md walks through adding one.
"""
