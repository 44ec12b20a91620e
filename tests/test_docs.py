"""The documentation stays true to its sources: the results pages are what docs/results/build.py
writes from the committed data, and the README stays short and keeps its Quickstart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"

# The README's Quickstart, verbatim (.ci/run calls the second line).
QUICKSTART = (
    "pip install -e . && staprune demo                      # install; dense vs STA vs random vs ToMe on the two "
    "bundled demo models (~1.5 min on 2 cores)",
    'pip install -e ".[test]" && ruff check . && python -m pytest -q   # install; lint and run the whole test suite',
)


def test_results_pages_are_generated_from_the_committed_data(tmp_path):
    run = subprocess.run(
        [sys.executable, str(RESULTS / "build.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    generated = sorted(p.name for p in tmp_path.glob("*.md"))
    assert generated, "build.py wrote no pages"
    committed = sorted(p.name for p in RESULTS.glob("*.md"))
    assert committed == generated, "docs/results/*.md are not the pages build.py writes"
    stale = [
        name
        for name in generated
        if (RESULTS / name).read_text(encoding="utf-8") != (tmp_path / name).read_text(encoding="utf-8")
    ]
    assert not stale, f"stale results pages {stale}: run `python docs/results/build.py` and commit them"


def test_every_results_table_says_where_it_came_from():
    for path in sorted((RESULTS / "data").glob("*.json")):
        table = json.loads(path.read_text(encoding="utf-8"))
        for field in ("command", "machine", "date", "columns", "rows"):
            assert table.get(field), f"{path.name}: no {field}"


def test_readme_is_short_and_keeps_its_quickstart():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0].splitlines()
    for command in QUICKSTART:
        assert command in quickstart, f"README Quickstart lost: {command}"
    assert "](docs/" in text, "README.md links into docs/"


def test_readme_links_into_docs_resolve():
    text = README.read_text(encoding="utf-8")
    targets = {link.split("#", 1)[0] for link in _links(text) if link.startswith("docs/")}
    assert targets
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_headline_table_is_the_committed_demo_result():
    table = json.loads((RESULTS / "data" / "demo_vit.json").read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    assert f"`{table['command']}`" in text
    for row in table["rows"]:
        assert "| " + " | ".join(row) + " |" in text, (
            f"README headline table differs from demo_vit.json: {row}"
        )


def _links(text: str) -> list[str]:
    import re

    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_docs_site_builds_strictly(tmp_path):
    """Every page, link, anchor and API docstring of the site: ``mkdocs build --strict``."""
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file()
