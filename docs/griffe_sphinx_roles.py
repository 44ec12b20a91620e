"""Griffe extension for the API pages: Sphinx roles in staprune's docstrings as code spans.

The docstrings are Google style but cross-reference with Sphinx roles (``:func:`staprune.patch```,
``:class:`~staprune.families.base.Family```), which Markdown would print as ``:func:staprune.patch``.
This rewrites each role to a code span of its target (``~`` keeps the last component, as Sphinx
does), before the docstring is parsed. Loaded by mkdocs.yml (mkdocstrings ``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")


def _code_span(match: re.Match[str]) -> str:
    target = match.group(2).strip()
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in every docstring to Markdown code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_code_span, obj.docstring.value)
