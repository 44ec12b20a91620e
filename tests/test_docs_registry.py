"""The documentation follows the registry: every family and every registry name in the supported-models
table of docs/families/index.md, every video-LLM family in the README, the right family count where a
page states one, and every video-token method on the video-LLM page.

Each check is a function of the page's text, so each is also run on a copy with one entry removed
(or one number changed) and must fail there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from staprune.core.video_methods import video_method_names
from staprune.families import VIDEO_CLASSIFIER, VIDEO_LLM, families, model_names

ROOT = Path(__file__).resolve().parent.parent
FAMILIES_PAGE = ROOT / "docs" / "families" / "index.md"
VIDEO_LLMS_PAGE = ROOT / "docs" / "families" / "video-llms.md"
README = ROOT / "README.md"

NUMBERS = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split())}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def short_title(title: str) -> str:
    """A family's title without its parenthesis: ``Qwen2.5-VL (transformers)`` -> ``Qwen2.5-VL``."""
    return title.split(" (", 1)[0].strip()


def supported_models_table(text: str) -> str:
    """The table rows of the "Supported models" section (one table per kind, or one for all)."""
    if "\n## Supported models\n" not in text:
        return ""
    section = text.split("\n## Supported models\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]  # the particulars that follow are prose
    return "\n".join(line for line in section.splitlines() if line.lstrip().startswith("|"))


def missing_from_table(text: str) -> list[str]:
    """Families (by name in backticks, or title) and registry names the supported-models table lacks."""
    table = supported_models_table(text)
    missing = [f"family {f.name}" for f in families()
               if f"`{f.name}`" not in table and short_title(f.title) not in table]
    missing += [f"model {name}" for name in model_names() if f"`{name}`" not in table]
    return missing


def video_llm_families_missing(text: str) -> list[str]:
    """Video-LLM families whose name (its title without the parenthesis) the text does not mention."""
    return [f.name for f in families() if f.kind == VIDEO_LLM and short_title(f.title) not in text]


def wrong_family_counts(text: str) -> list[str]:
    """Statements like "nine families" or "5 video-classifier families" that differ from the registry."""
    counts = {"": len(families()),
              "video-classifier": sum(f.kind == VIDEO_CLASSIFIER for f in families()),
              "video-LLM": sum(f.kind == VIDEO_LLM for f in families())}
    pattern = re.compile(r"\b(\d+|" + "|".join(NUMBERS) + r")\s+(?:(video[- ]classifier|video[- ]LLM)\s+)?families\b",
                         re.IGNORECASE)
    wrong = []
    for match in pattern.finditer(text):
        word, kind = match.group(1).lower(), (match.group(2) or "")
        stated = int(word) if word.isdigit() else NUMBERS[word]
        key = "" if not kind else ("video-classifier" if "classifier" in kind.lower() else "video-LLM")
        if stated != counts[key]:
            wrong.append(f"{match.group(0)!r}: the registry has {counts[key]}")
    return wrong


def methods_paragraph(text: str) -> str:
    """The video-LLM page's list of methods: from "**Methods**" to the next section."""
    if "**Methods**" not in text:
        return ""
    return text.split("**Methods**", 1)[1].split("\n## ", 1)[0]


def methods_missing(text: str) -> list[str]:
    listed = methods_paragraph(text)
    return [name for name in video_method_names() if f"`{name}`" not in listed]


def _without_line(text: str, needle: str) -> str:
    """``text`` without the first line holding ``needle`` (that line must exist)."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if needle in line)
    return "\n".join(lines[:index] + lines[index + 1:])


# --- the pages as they are -----------------------------------------------------------------------------
def test_the_supported_models_table_names_every_family_and_registry_name():
    text = _read(FAMILIES_PAGE)
    assert supported_models_table(text), "docs/families/index.md has no supported-models table"
    assert not missing_from_table(text), f"docs/families/index.md supported models lacks {missing_from_table(text)}"


def test_the_readme_names_every_video_llm_family():
    missing = video_llm_families_missing(_read(README))
    assert not missing, f"README.md does not name the video-LLM families {missing}"


@pytest.mark.parametrize("path", [FAMILIES_PAGE, README], ids=["families page", "README"])
def test_a_stated_family_count_is_the_registry_s(path):
    wrong = wrong_family_counts(_read(path))
    assert not wrong, f"{path.relative_to(ROOT)}: {wrong}"


def test_the_video_llm_page_lists_every_video_token_method():
    text = _read(VIDEO_LLMS_PAGE)
    assert methods_paragraph(text), "docs/families/video-llms.md has no **Methods** paragraph"
    assert not methods_missing(text), f"docs/families/video-llms.md does not list the methods {methods_missing(text)}"


# --- each check fails when the page falls behind --------------------------------------------------------
def test_a_table_without_a_family_s_row_fails():
    text = _read(FAMILIES_PAGE)
    internvl = next(f for f in families() if f.name == "internvl")
    assert "family internvl" in missing_from_table(_without_line(text, f"`{internvl.name}`"))
    # a registry name spelled only in a shorter form is missing too
    shortened = text.replace("`InternVL3-1B`, `InternVL3-2B`, `InternVL3-8B`", "`InternVL3-1B/2B/8B`")
    assert shortened != text and "model InternVL3-2B" in missing_from_table(shortened)
    assert missing_from_table("# Families\n\nno table\n")


def test_a_readme_without_a_video_llm_family_fails():
    text = _read(README).replace("InternVL3", "VL3").replace("InternVL", "")
    assert video_llm_families_missing(text) == ["internvl"]


def test_a_wrong_family_count_fails():
    total = len(families())
    assert wrong_family_counts(f"staprune has {total} families.") == []
    assert wrong_family_counts(f"staprune has {total - 1} families.")
    classifiers = sum(f.kind == VIDEO_CLASSIFIER for f in families())
    words = {n: word for word, n in NUMBERS.items()}
    assert wrong_family_counts(f"{words[classifiers].capitalize()} video-classifier families.") == []
    assert wrong_family_counts(f"{words[classifiers + 1]} video classifier families")
    assert wrong_family_counts("Families come in two kinds.") == []  # no count of families


def test_a_video_llm_page_without_a_method_fails():
    text = _read(VIDEO_LLMS_PAGE)
    paragraph = methods_paragraph(text)
    for name in video_method_names():
        assert methods_missing(text.replace(paragraph, paragraph.replace(f"`{name}`", name))) == [name]
    assert methods_missing("# Video LLMs\n\nno methods paragraph\n") == video_method_names()
