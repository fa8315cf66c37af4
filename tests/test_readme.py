"""The Python snippets of the README and of every documentation page run as written,
and the README's two commands match CI."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Every Markdown page of the documentation site (docs/_build holds only build output).
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_guides_are_pages_of_the_site():
    names = {p.relative_to(ROOT / "docs").as_posix() for p in PAGES}
    for guide in ["quickstart", "conventions", "why_we_differ", "linen", "nnx", "equinox",
                  "flax_differences", "scaling_out", "export", "porting_pytorch", "family"]:
        assert f"guides/{guide}.md" in names


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_snippets_run(page):
    text = page.read_text()
    blocks = _blocks(text, "python")
    if page.name == "README.md" or page.parent.name == "guides":
        if page.stem not in ("conventions", "why_we_differ", "flax_differences"):
            assert blocks, f"{page.name} should have Python examples"
    for i, code in enumerate(blocks):
        namespace = {"__name__": f"{page.stem}_block_{i}"}
        exec(compile(code, f"{page.relative_to(ROOT)} python block {i}", "exec"), namespace)


def test_readme_starts_with_exactly_two_commands_and_ci_runs_the_second():
    bash = _blocks(README, "bash")
    # The first two code blocks of the README are the two commands, one line each.
    first_blocks = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)[:2]
    assert [lang for lang, _ in first_blocks] == ["bash", "bash"]
    assert all(len(code.strip().splitlines()) == 1 for _, code in first_blocks)
    test_command = bash[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the README's test command after its own venv lines.
    tail = test_command.split("&& . .venv/bin/activate && ", 1)[1]
    assert tail in ci


def test_ci_runs_the_readmes_docs_and_sdist_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    bash = [b.strip() for b in _blocks(README, "bash")]
    docs = next(b for b in bash if "sphinx-build" in b)
    assert docs == 'pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html'
    assert docs in ci
    sdist = next(b for b in bash if b.startswith("tar xzf dist/"))
    assert sdist.split(" && ", 2)[2] in ci  # what follows `tar xzf ... && cd ...`
    for step in ["sphinx-build -W -b doctest docs", "python docs/check_site.py",
                 "apt-get install -y -q chromium"]:
        assert step in ci, step


def test_readme_links_lead_to_files():
    # The front page links into the site's sources; each relative link names a file here.
    links = [t for t in re.findall(r"\]\(([^)#]+)[^)]*\)", README) if "://" not in t]
    assert len(links) >= 15
    for target in links:
        assert (ROOT / target).exists(), target


def test_readme_states_the_test_suites_time_and_memory():
    text = " ".join(README.split())
    assert re.search(r"runs the test suite: about \d+ minutes on an idle 2-core machine "
                     r"\(\d+ s measured on \d{4}-\d\d-\d\d[^()]*; up to \d+ min under load\), "
                     r"about \d+(\.\d)? GB peak memory", text)
