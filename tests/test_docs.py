"""The documentation site: it builds with warnings as errors, documents every public name,
and the figures its pages quote are the ones the code and the saved results give.

The Python blocks of the pages run in ``test_readme.py``; the browser check of the built
site is ``docs/check_site.py`` (CI runs it with headless Chromium).
"""

import csv
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _public():
    """(qualified name, object) for every public name of the five public modules."""
    import dropnorm
    import dropnorm.equinox
    import dropnorm.interop
    import dropnorm.linen
    import dropnorm.nnx

    out = []
    for module in (dropnorm, dropnorm.linen, dropnorm.nnx, dropnorm.equinox, dropnorm.interop):
        names = getattr(module, "__all__", None) or [
            n for n, v in vars(module).items()
            if not n.startswith("_") and inspect.isfunction(v)
            and v.__module__ == module.__name__]
        out += [(f"{module.__name__}.{n}", getattr(module, n)) for n in names]
    return out


PUBLIC = _public()


def test_every_public_name_is_in_the_api_reference():
    api = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"\.\. auto(?:function|class):: (\w+)", api))
    assert {q.rsplit(".", 1)[1] for q, _ in PUBLIC} <= documented
    assert len(PUBLIC) >= 33  # 11 pure names, 6 linen, 6 nnx, 5 equinox, 5 interop


def _arguments(cls) -> set[str]:
    """A module's constructor arguments: dataclass fields (linen) or ``__init__``'s (NNX)."""
    import dataclasses

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


@pytest.mark.parametrize("qualname,obj", PUBLIC, ids=[q for q, _ in PUBLIC])
def test_docstring_has_the_house_sections(qualname, obj):
    # Google style (house style): what goes in, what comes out, what is refused, a doctested
    # example and the paper. Classes document their fields as Args or Attributes.
    doc = inspect.getdoc(obj) or ""
    sections = set(re.findall(r"(?m)^(\w+):$", doc))
    if inspect.isclass(obj):
        required = {"Examples", "References"}
        if not sections & {"Args", "Attributes"}:
            # A variant may document its arguments by naming the public class it shares
            # them with ("Fields and call as :class:`Dropout`"), if it adds none.
            module = sys.modules[obj.__module__]
            named = [getattr(module, n) for n in re.findall(r":class:`(\w+)`", doc)
                     if n in getattr(module, "__all__", ()) and n != obj.__name__]
            assert any(_arguments(obj) <= _arguments(c) for c in named), (
                f"{qualname}: no Args/Attributes section, and no public class with all its "
                "arguments is named for them")
    else:
        required = {"Args", "Returns", "Raises", "Examples", "References"}
    assert required <= sections, f"{qualname} lacks {sorted(required - sections)}"
    assert ">>> " in doc, f"{qualname}: the Examples section has no doctest"


def test_site_builds_with_warnings_as_errors(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    for page in ["index.html", "results.html", "benchmarks.html", "api/dropnorm.html",
                 "api/linen.html", "api/nnx.html", "api/equinox.html", "api/interop.html",
                 *(f"guides/{p.stem}.html" for p in (DOCS / "guides").glob("*.md"))]:
        assert page in pages, page
    # Every public name has its own anchor, with napoleon's rendering of its sections.
    html = {name: (out / "api" / f"{name}.html").read_text()
            for name in ("dropnorm", "linen", "nnx", "equinox", "interop")}
    for qualname, _ in PUBLIC:
        page = "dropnorm" if qualname.count(".") == 1 else qualname.split(".")[1]
        assert f'id="{qualname}"' in html[page], qualname
    assert "Parameters" in html["dropnorm"] and "Return type" in html["dropnorm"]
    # The benchmarks page includes BENCHMARKS.md; the results page shows every plot.
    bench_first_heading = (ROOT / "BENCHMARKS.md").read_text().splitlines()[0].lstrip("# ")
    assert bench_first_heading in (out / "benchmarks.html").read_text()
    results = (out / "results.html").read_text()
    for png in sorted((DOCS / "results").glob("*.png")):
        assert f"_images/{png.name}" in results, png.name
        assert (out / "_images" / png.name).read_bytes() == png.read_bytes()


# --- figures quoted by the pages --------------------------------------------------------------


def _rows(name):
    with open(DOCS / "results" / name, newline="") as f:
        return list(csv.DictReader(f))


def test_results_page_tables_are_the_saved_tables():
    page = (DOCS / "results.md").read_text()
    saved = (DOCS / "results" / "results.md").read_text()
    rows = [line for line in page.splitlines() if re.match(r"\| (mnist1d|digits|mlp|cnn) \|", line)]
    assert len(rows) == 16 + 12  # the main grid and the variance-shift table
    for line in rows:
        assert line in saved, line


def test_results_page_percentages_are_in_the_saved_results():
    # Every "a ± b%" in the prose is a mean ± std over seeds of some saved accuracy.
    page = (DOCS / "results.md").read_text()
    known = set()
    for name in ("results.csv", "sweeps.csv", "variance_shift.csv"):
        for r in _rows(name):
            known.add((f"{100 * float(r['test_acc_mean']):.1f}",
                       f"{100 * float(r['test_acc_std']):.1f}"))
    quoted = re.findall(r"(\d+\.\d) ± (\d+\.\d)%", page)
    assert len(quoted) >= 4
    for pair in quoted:
        assert pair in known, pair
    # And every other one-decimal percentage is some saved accuracy (mean over seeds), but
    # those of the sentence on examples/mnist1d.py, a separate run (one seed).
    means = {f"{100 * float(r[k]):.1f}" for name in ("results.csv", "sweeps.csv",
                                                     "variance_shift.csv")
             for r in _rows(name) for k in r if k.endswith("acc_mean")}
    prose = re.sub(r"The example script's defaults.*?\.\n\n", "", page, flags=re.S)
    assert prose != page
    percentages = re.findall(r"(?<!± )\b(\d+\.\d)%", prose)  # the std of a ± is above
    assert len(percentages) >= 15
    for value in percentages:
        assert value in means, value
    # Wall time and number of configurations: those of the run in timing.md.
    timing = (DOCS / "results" / "timing.md").read_text()
    seconds = re.search(r"Wall time: (\d+) s \((\d+\.\d) min\)", timing).groups()
    assert f"**{seconds[0]} s ({seconds[1]} min)**" in page
    n_runs = len(re.findall(r"(?m)^\| (?:mnist1d|digits) \|", timing))
    assert f"{n_runs} configurations" in page


def test_fold_example_matches_and_its_figures_are_on_the_family_page():
    # examples/fold_batch_norm.py trains, folds and compares; run once here for both checks.
    # The defaults, as `python examples/fold_batch_norm.py` runs for a user: in a subprocess
    # with XLA's default code generation (tests/conftest.py compiles without LLVM's passes
    # and with XLA CPU's older fusion emitters, which changes the last bits of the rounding
    # difference quoted below).
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith(("--xla_backend_optimization_level",
                                          "--xla_cpu_use_fusion_emitters")))
    code = ("import json, runpy; m = runpy.run_path('examples/fold_batch_norm.py'); "
            "print(json.dumps(m['main'](verbose=False)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=dict(os.environ, XLA_FLAGS=flags))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # The example works: it trained (digits, 10 classes), and folding kept every prediction
    # and the float32 logits (of order 10) to rounding.
    assert r["test_accuracy"] > 0.9
    assert r["same_predictions"] == 1.0
    assert r["max_abs_diff"] < 1e-4
    page = (DOCS / "guides" / "family.md").read_text()
    m = re.search(r"on our run, ([\d.]+)% test accuracy, ([\d.]+)% identical predictions, "
                  r"logits equal to within ([\d.e-]+) \(float32 rounding; logits up to ([\d.]+)\)",
                  page)
    assert m, "the family page should quote the fold example's output"
    accuracy, same, diff, largest = m.groups()
    assert accuracy == f"{100 * r['test_accuracy']:.1f}"  # of 450 test images
    assert same == f"{100 * r['same_predictions']:.0f}"
    assert largest == f"{r['max_abs_logit']:.1f}"
    # The largest of 4500 float32 rounding differences (here 1 to 2 ulps of the largest logit)
    # depends on the order XLA sums in, which may differ on another CPU, so the quoted value
    # is checked to 10%, not digit for digit; that still catches a stale figure (the 1.9e-6
    # once quoted is 20% off today's 2.38e-6).
    assert abs(float(diff) - r["max_abs_diff"]) <= 0.1 * r["max_abs_diff"], (diff, r)
