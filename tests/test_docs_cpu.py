"""README.md and docs/ stay navigable and true: short README, every link and anchor resolves,
every page is linked, the layout names what exists, and the figures come from the files the
scripts write (the decode-step JSON, the fresh set-up transcript)."""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from symm_rs import env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # no headings in code
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def _links(page: Path) -> list[str]:
    return [
        link
        for link in LINK.findall(page.read_text())
        if not link.startswith(("http://", "https://", "mailto:"))
    ]


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 320


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page: Path) -> None:
    for link in _links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} -> {target} does not exist"
        if anchor:
            assert target.suffix == ".md", link
            assert anchor in _anchors(target), f"{page.name}: no heading for #{anchor} in {path}"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    assert {page.resolve() for page in DOCS} <= linked


def test_layout_names_every_script_and_page() -> None:
    readme = README.read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    for script in (ROOT / "scripts").iterdir():
        if script.suffix in (".py", ".sh"):
            assert script.name in layout, f"Layout does not name scripts/{script.name}"
    for page in DOCS:
        assert page.stem in layout.split("docs/", 1)[1].splitlines()[0], page.name
    for line in layout.splitlines():
        first = line.split()[0] if line and not line.startswith(" ") else ""
        if first.endswith("/"):
            assert (ROOT / first).is_dir(), f"Layout names {first}, which does not exist"


def test_environment_table_lists_every_variable() -> None:
    readme = README.read_text()
    table = readme.split("## Environment variables", 1)[1].split("\n\n", 2)[1]
    named = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    assert named == {*env.VARIABLES, "NCCL_SYM_CTAS"}


def _half_up(value: float, places: str) -> Decimal:
    return Decimal(str(value)).quantize(Decimal(places), ROUND_HALF_UP)


def test_headline_table_is_the_decode_step_json() -> None:
    runs = [
        json.loads((ROOT / "benches" / "results" / f"decode_step_{n}gpu.json").read_text())
        for n in (2, 4)
    ]
    lines = []
    for two, four in zip(runs[0]["rows"], runs[1]["rows"], strict=True):
        cells = [str(two["batch_size"])]
        for row in (two, four):
            change = int(_half_up(row["symm_vs_plain"] * 100, "1"))
            cells += [str(_half_up(row["plain_us"], "0.1"))]
            cells += [f"{_half_up(row['symm_us'], '0.1')} ({change:+d}%)"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    assert table in README.read_text()
    assert table in (ROOT / "docs" / "results.md").read_text()
    times = "\N{MULTIPLICATION SIGN}"
    machine = f"{runs[1]['world_size']} {times} {runs[1]['device'].split()[-1]}"
    assert machine == f"4 {times} H200"
    readme = " ".join(README.read_text().split())
    assert f"Machine: a {machine} host" in readme
    assert f"torch {runs[1]['torch']}, NCCL {runs[1]['nccl']}, {runs[1]['date']}" in readme


def test_setup_figures_are_the_fresh_transcript() -> None:
    transcript = (ROOT / "tests" / "results" / "fresh_setup.txt").read_text()
    header = dict(
        line[2:].split(": ", 1)
        for line in transcript.splitlines()
        if line.startswith("# ") and ": " in line
    )
    if "commit" not in header:  # written before scripts/fresh_setup.sh existed
        pytest.skip("tests/results/fresh_setup.txt predates scripts/fresh_setup.sh")
    times = re.findall(r"^# took (\d+) s: (.+)$", transcript, re.MULTILINE)
    assert [command for _, command in times] == [
        "pip install . && python -m symm_rs doctor",
        "pip install '.[dev]' && make test",
        "make dist dist-check",
    ]
    assert header["exit status"] == "0"
    readme = " ".join(README.read_text().split())
    for seconds, _ in times:
        assert f"{seconds} s" in readme
    passed, skipped = re.fullmatch(r"(\d+) passed, (\d+) skipped in .*", header["tests"]).groups()
    assert f"{passed} passed, {skipped} skipped" in readme
    venv_size = header["virtualenv"].split(",")[0]
    assert f"virtualenv of {venv_size}" in readme
    assert header["commit"].split()[0][:7] in readme
