"""The README and docs/ as a reader meets them: the README's results table carries a
provenance line (the one stages/report.py writes above report/summary.md) whose commit is
in the history; the README stays a short page; every relative link in the README and in
docs/ reaches a file (and, with #anchor, a heading of it); every experiment page opens with
its header (date, commit, CPU, torch, command) and is listed in the experiments index; the
library snippet's imports exist. Fast: no repro, no model."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXPERIMENTS = DOCS / "experiments"
README_MAX_LINES = 300
# what stages/report.py's provenance_line writes: "Provenance: <date> · commit <hash>[+dirty] · <processor> · torch <version>"
PROVENANCE = re.compile(r"Provenance: (\d{4}-\d{2}-\d{2}) · commit ([0-9a-f]{7,40})(\+dirty)? · (.+) · torch (\S+)")
HEADER_FIELDS = ("Date", "Commit", "CPU", "torch", "Command")
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|\!\[[^\]]*\]\(([^)\s]+)\)")


def in_history(commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT,
                          capture_output=True).returncode == 0


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (a `# comment` in one is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation but `-`
    and `_` dropped, spaces as `-`, a repeated slug numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = [a or b for a, b in LINK.findall(prose(path.read_text()))]
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def broken_links(path: Path) -> list[str]:
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve()
        if not file.exists():
            broken.append(f"{path.relative_to(ROOT)}: {link} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{path.relative_to(ROOT)}: {link} (no heading #{anchor} in {target})")
    return broken


def experiment_pages() -> list[Path]:
    return sorted(p for p in EXPERIMENTS.glob("*.md") if p.name != "README.md")


def header_problems(page: Path) -> list[str]:
    """What is wrong with an experiment page's opening: its title, a blank line, then one
    `- **Field:** value` line per header field in order, each with a value; the commit line
    names commits of this repository's history (or says "not recorded")."""
    lines = page.read_text().splitlines()
    name = page.relative_to(ROOT)
    if not lines or not lines[0].startswith("# "):
        return [f"{name}: line 1 is not the page's title"]
    problems = []
    fields = lines[2:2 + len(HEADER_FIELDS)]
    for number, (field, line) in enumerate(zip(HEADER_FIELDS, fields + [""] * len(HEADER_FIELDS)), start=3):
        match = re.fullmatch(rf"- \*\*{field}:\*\* (\S.*)", line)
        if not match:
            problems.append(f"{name}: line {number} is not '- **{field}:** <value>': {line!r}")
            continue
        value = match.group(1)
        if field == "Date" and not re.match(r"\d{4}-\d{2}-\d{2}", value) and "not recorded" not in value:
            problems.append(f"{name}: the date {value!r} is not YYYY-MM-DD")
        if field == "Commit":
            commits = re.findall(r"\b[0-9a-f]{7,40}\b", value)
            if not commits and "not recorded" not in value:
                problems.append(f"{name}: the commit line names no commit: {value!r}")
            problems += [f"{name}: commit {c} is not in the history" for c in commits if not in_history(c)]
    return problems


# --- the README's results table ---------------------------------------------------------

def test_the_readme_results_table_carries_a_provenance_line_from_the_history():
    lines = README.read_text().splitlines()
    found = [(i, m) for i, line in enumerate(lines) if (m := PROVENANCE.fullmatch(line))]
    assert len(found) == 1, f"README.md: {len(found)} provenance lines, want 1 above the results table"
    i, provenance = found[0]
    assert lines[i + 1] == "" and lines[i + 2].startswith("| model | sparsity |"), \
        "README.md: the provenance line is not directly above the results table (a copy of report/summary.md)"
    assert in_history(provenance.group(2)), f"README.md: provenance commit {provenance.group(2)} is not in the history"
    assert not provenance.group(3), "README.md: the results came from uncommitted code (+dirty)"


def test_the_provenance_pattern_is_what_the_report_writes():
    """The pattern above reads what stages/report.py writes, so a copied summary passes."""
    from stages import report

    env = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "gpu": None, "torch": "2.13.0"}
    line = report.provenance_line(env, {"git_commit": "784ec70" + "0" * 33, "dirty": False}, "2026-11-24")
    assert PROVENANCE.fullmatch(line), line


def test_the_readme_is_a_short_page():
    count = len(README.read_text().splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines; at most {README_MAX_LINES}: move detail to docs/"


# --- links --------------------------------------------------------------------------------

def test_every_docs_link_of_the_readme_resolves():
    links = [link for link in relative_links(README) if link.startswith("docs/")]
    assert len(links) >= 10, links  # the index of the docs, at least
    assert broken_links(README) == []


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_relative_link_of_a_docs_page_resolves(page):
    assert broken_links(page) == []


# --- the experiment pages -----------------------------------------------------------------

@pytest.mark.parametrize("page", experiment_pages(), ids=lambda p: p.name)
def test_every_experiment_page_opens_with_its_header(page):
    assert header_problems(page) == []


def test_the_experiments_index_lists_every_page():
    index = EXPERIMENTS / "README.md"
    listed = {link.partition("#")[0] for link in relative_links(index)}
    assert {p.name for p in experiment_pages()} <= listed
    assert len(experiment_pages()) >= 9  # the studies of issue 38, at least


# --- the library snippet ------------------------------------------------------------------

def test_the_architecture_snippets_imports_exist():
    code = "\n".join(re.findall(r"```python\n(.*?)```", (DOCS / "architecture.md").read_text(), re.S))
    imports = re.findall(r"^from (cofi[\w.]*) import (.+)$", code, re.M)
    assert imports
    for module, names in imports:
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_the_experiment_pages_params_yaml_points_to_exist():
    pointers = set(re.findall(r"experiments/([\w-]+\.md)", (ROOT / "params.yaml").read_text()))
    assert pointers, "params.yaml points to no experiment page"
    assert sorted(p for p in pointers if not (EXPERIMENTS / p).exists()) == []
