"""CONTRIBUTING's Layout table, the links and images of every page (README, CONTRIBUTING,
docs/) and docs/DESIGN.md name files that exist (and that a clone gets); every module has a row;
the README stays a page a user reads in a few minutes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "agents", "envs", "policies")


PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def _layout_rows() -> list[str]:
    guide = (ROOT / "CONTRIBUTING.md").read_text()
    section = guide.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def _named_paths(row: str) -> list[Path]:
    """Every path a row names; a bare file name is relative to the folder named before it."""
    paths: list[Path] = []
    folder = Path()
    for name in re.findall(r"`([\w./-]+)`", row):
        if "/" in name:
            paths.append(Path(name))
            folder = Path(name) if name.endswith("/") else Path(name).parent
        elif name.endswith(".py"):
            paths.append(folder / name)
    return paths


def test_every_path_in_the_layout_table_exists() -> None:
    named = [p for row in _layout_rows() for p in _named_paths(row)]
    assert named
    missing = [str(p) for p in named if not (ROOT / p).exists()]
    assert not missing, missing


def test_every_module_is_found_from_the_layout_table() -> None:
    # A module is covered by a row naming it, or by a row naming its folder ("agents/memory/").
    named = {p for row in _layout_rows() for p in _named_paths(row)}
    folders = {str(p) for row in _layout_rows() for p in re.findall(r"`([\w/]+/)`", row)}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.name == "__init__.py" or rel.name == "__main__.py":
                continue
            covered = rel in named or any(str(rel).startswith(f) for f in folders - {f"{package}/"})
            assert covered, f"CONTRIBUTING's Layout table does not say where {rel} belongs"


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_and_image_exists_and_is_committed(page: Path) -> None:
    text = page.read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    targets = set()
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name} links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            titles = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.MULTILINE)
            assert anchor in {_anchor(t) for t in titles}, f"{page.name}: no heading #{anchor}"
        targets.add(str(target.relative_to(ROOT)))
    if page.name == "README.md":
        assert any(t.endswith(".md") for t in targets)
    if (ROOT / ".git").exists() and shutil.which("git") and targets:
        # An ignored file exists here but never reaches a clone (or the page a user reads).
        ignored = subprocess.run(
            ["git", "check-ignore", *sorted(targets)], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
        assert not ignored, f"{page.name} links to git-ignored files: {ignored}"


def test_the_readme_is_read_in_five_minutes_and_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for doc in ["CONTRIBUTING.md", *(f"docs/{p.name}" for p in PAGES if p.parent.name == "docs")]:
        assert f"]({doc})" in readme, f"the README does not link {doc}"
    first_screen = "\n".join(readme.splitlines()[:30])
    assert "make run" in first_screen and "make test" in first_screen


def test_the_benchmarks_page_narrates_no_earlier_run() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for phrase in ("earlier run", "earlier machine", "a day later", "later machine", "sitting"):
        assert phrase not in text.lower(), phrase
    headers = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headers and all(re.search(r"\d{4}-\d{2}-\d{2}, commit [0-9a-f]{7}", h) for h in headers)


def test_files_named_in_the_design_doc_exist() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    names = set(re.findall(r"`((?:orchestrator|agents|envs|policies)/[\w/]+\.py)`", design))
    assert names
    missing = sorted(n for n in names if not (ROOT / n).is_file())
    assert not missing, missing


def test_every_module_says_what_runs_there() -> None:
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text().lstrip()
            assert text.startswith('"""') and len(text.split('"""')[1].strip()) > 20, path
