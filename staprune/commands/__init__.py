"""One module per ``staprune`` command, each exposing ``add_arguments(parser)`` and ``run(args)``.
Commands never import each other; what two of them share lives in :mod:`staprune.runs` or below."""
