"""Every example in the README and docs/ runs as written: each `resnet ...` line of a ```sh block is
checked against the real parser, and those that need only the repository's files and no weights are
run. Links between the pages lead somewhere."""

from __future__ import annotations

import re
import shlex

import pytest
from doc_commands import REPO, check_parses, resnet_commands, runnable_here, sh_blocks, shell_lines, with_placeholders

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
#: The manual's pages, one per topic (issue 10).
TOPICS = ["predict", "batch-jobs", "inspect", "cache", "output-formats"]


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(page, shell line, argv after `resnet`) for every resnet command in a ```sh block."""
    found = []
    for page in PAGES:
        for block in sh_blocks(page.read_text()):
            for line in shell_lines(block):
                for argv in resnet_commands(line):
                    found.append((str(page.relative_to(REPO)), line, argv))
    return found


COMMANDS = doc_commands()


def test_the_readme_is_short_and_the_manual_is_beside_it():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    for topic in TOPICS:
        assert (REPO / "docs" / f"{topic}.md").is_file(), topic
    assert len(COMMANDS) > 40  # the examples were found


@pytest.mark.parametrize("page, line, argv", COMMANDS, ids=[f"{p}:{shlex.join(a)[:60]}" for p, _, a in COMMANDS])
def test_every_documented_command_parses(page, line, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    check_parses(with_placeholders(argv, tmp_path), f"{page}: {line}")


def test_a_documented_command_the_parser_rejects_fails_the_check(tmp_path):
    block = sh_blocks("text\n\n```sh\nfind . -print0 | resnet predict - --null --top zero  # planted\n```\n")[0]
    (argv,) = [argv for line in shell_lines(block) for argv in resnet_commands(line)]
    assert argv == ["predict", "-", "--null", "--top", "zero"]
    with pytest.raises(AssertionError, match="does not parse"):
        check_parses(argv, "planted")


def test_the_documented_commands_that_need_no_weights_run(runner, app, monkeypatch):
    monkeypatch.chdir(REPO)
    ran = set()
    for page, line, argv in COMMANDS:
        if runnable_here(argv):
            result = runner.invoke(app, argv, prog_name="resnet")
            assert result.exit_code == 0, f"{page}: {line}\n{result.output}"
            ran.add(shlex.join(argv))
    assert {"summary resnet50", "summary resnet18 --params", "list", "features resnet18 --input-size 640"} <= ran


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_between_pages_lead_somewhere(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"
