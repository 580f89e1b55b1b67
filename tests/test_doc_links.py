"""Every relative link in the README, the docs pages and the results index points to a file that
exists, and every #anchor to a heading that exists (mkdocs checks only the links inside docs/)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    h = heading.strip("#").strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def _anchors(path: Path) -> set:
    return {_slug(line) for line in path.read_text().splitlines() if line.startswith("#")}


def broken_links(files, root: Path = ROOT) -> list:
    bad = []
    for f in files:
        text = re.sub(r"```.*?```", "", f.read_text(), flags=re.S)
        for _, target in LINK.findall(text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dst = (f.parent / path).resolve() if path else f
            if not dst.exists():
                bad.append(f"{f.relative_to(root)}: {target} (no such file)")
            elif anchor and dst.suffix == ".md" and anchor not in _anchors(dst):
                bad.append(f"{f.relative_to(root)}: {target} (no such heading)")
    return bad


def test_readme_and_docs_links_resolve():
    files = [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    assert broken_links(files) == []


def test_the_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no anchor](#nope) [web](https://x.org)\n")
    assert broken_links([page], root=tmp_path) == ["page.md: missing.md (no such file)",
                                                   "page.md: #nope (no such heading)"]
