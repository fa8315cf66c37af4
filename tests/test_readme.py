"""The README's Python snippets run as written, and its two commands match CI."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_snippets_run():
    blocks = _blocks("python")
    assert blocks, "the README should have Python examples"
    for i, code in enumerate(blocks):
        namespace = {"__name__": f"readme_block_{i}"}
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)


def test_readme_starts_with_exactly_two_commands_and_ci_runs_the_second():
    bash = _blocks("bash")
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
