"""Packaging metadata: licence, URLs, classifiers, extras, and the README's statement of them.

What the built wheel and sdist contain, and that the sdist's tests run, is checked by CI
(``.ci/run``), which builds them.
"""

import importlib.metadata
import pathlib
import re
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
README = (ROOT / "README.md").read_text()


def test_license_is_an_spdx_string_with_the_apache_text_shipped():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000
    # PEP 639: a licence classifier next to a licence expression is an error for setuptools.
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])
    # The sdist ships it as well (MANIFEST.in), and the setuptools that builds it knows PEP 639.
    assert "LICENSE" in (ROOT / "MANIFEST.in").read_text().split()
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_metadata_has_urls_classifiers_authors_and_a_changelog():
    assert {"Homepage", "Documentation", "Source", "Changelog"} <= set(PROJECT["urls"])
    assert "Programming Language :: Python :: 3.11" in PROJECT["classifiers"]
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert PROJECT["authors"] and all(a["name"] for a in PROJECT["authors"])
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {PROJECT['version']}" in changelog


def _requirements():
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("dropnorm[")]
    return reqs


def test_readme_states_the_declared_ranges_of_the_core_libraries():
    declared = {r.name: str(r.specifier) for r in _requirements()}
    for name in ["jax", "numpy", "flax", "torch"]:
        spec = ",".join(sorted(declared[name].split(","), reverse=True))  # ">=a,<b"
        assert f"`{name}{spec}`" in README, (name, spec)
    assert declared["jaxlib"] == declared["jax"]


def test_installed_versions_lie_in_the_declared_ranges():
    # The test environment (torch, then the test extra: every other extra) is a tested
    # configuration, so every declared requirement is installed and within its range.
    for req in _requirements():
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), (req, version)


def test_readme_lists_every_extra():
    table = re.findall(r"(?m)^\| `(\w+)` \|", README)
    assert sorted(table) == sorted(PROJECT["optional-dependencies"])
