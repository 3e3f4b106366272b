"""The README's Layout table, links and images and docs/DESIGN.md name files that exist (and
that a clone gets); every module has a row."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "agents", "envs", "policies")


def _layout_rows() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
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
            assert covered, f"README's Layout table does not say where {rel} belongs"


def test_every_local_link_and_image_in_the_readme_exists_and_is_committed() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = {t for t in re.findall(r"\]\(([^)#\s]+)\)", readme) if "://" not in t}
    assert any(t.endswith(".png") for t in targets)
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, missing
    if (ROOT / ".git").exists() and shutil.which("git"):
        # An ignored file exists here but never reaches a clone (or the page a user reads).
        ignored = subprocess.run(
            ["git", "check-ignore", *sorted(targets)], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
        assert not ignored, f"README links to git-ignored files: {ignored}"


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
