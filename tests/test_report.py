"""`bln-analyze NAME --report FILE.html`: one self-contained page, checked in a real headless
Chromium (as tests/test_ui.py drives the MLflow UI)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sweep import FAST, bln_sweep
from tests.test_ui import chromium

ROOT = Path(__file__).resolve().parents[1]


def bln_analyze(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "analysis", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "target, words",
    [("missing/report.html", ["--report", "missing", "does not exist"]), (".", ["a directory"])],
)
def test_report_into_a_missing_directory_is_one_line_and_writes_nothing(target, words, tmp_path):
    (tmp_path / "sweeps" / "x").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    p = bln_analyze("x", "--report", target, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_edge_note_flags_a_best_value_in_the_outer_tenth_on_the_searched_scale():
    import optuna.distributions as od

    from analysis.report import edge_note

    lr = od.FloatDistribution(1e-4, 1e-2, log=True)  # outer tenths: < 1.58e-4, > 6.3e-3
    assert "lower tenth" in edge_note("optim.lr", lr, 1.2e-4)
    assert "upper tenth" in edge_note("optim.lr", lr, 8e-3)
    assert edge_note("optim.lr", lr, 1e-3) is None  # the middle of the log range
    wd = od.FloatDistribution(0.0, 0.2)
    assert edge_note("optim.weight_decay", wd, 0.19) and edge_note("x", wd, 0.1) is None
    assert edge_note("optim.beta2", od.CategoricalDistribution([0.95, 0.99]), 0.95) is None


@pytest.fixture(scope="module")
def report_sweep(tmp_path_factory):
    """2 norms x 2 micro-batches, 3 trials + 2 confirm seeds each, in-process (debug)."""
    root = tmp_path_factory.mktemp("report")
    p = bln_sweep(
        "norm=layernorm,bln",
        "batch=b4,b16",
        "sweep.name=rep",
        "search.n_trials=3",
        "search.confirm_seeds=2",
        "launcher=debug",
        *FAST,
        cwd=root,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return root


@pytest.mark.slow
def test_report_is_one_self_contained_page_that_renders_in_a_real_browser(report_sweep, tmp_path):
    root = report_sweep
    out = tmp_path / "report.html"
    p = bln_analyze("rep", "--report", str(out), cwd=root)
    assert p.returncode == 0, p.stderr
    page = out.read_text()
    # self-contained: nothing fetched from anywhere (every image is a data: URI)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert page.count('src="data:image/png;base64,') >= 4 + 3  # 4 cells + vs_batch, heatmap, curves
    assert "bln-sweep norm=layernorm,bln batch=b4,b16 sweep.name=rep" in page
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert sha.stdout.strip() in page  # the code the runs ran
    assert "CPU-hours" in page

    driver, profile = chromium()
    try:
        driver.get(out.as_uri())
        tables = driver.find_elements("css selector", "table")
        assert len(tables) >= 2  # the ranked table and the norm x batch pivot
        ranked = tables[0].text
        for word in ("layernorm", "bln", "rank", "val/loss"):
            assert word in ranked
        assert len(tables[0].find_elements("css selector", "tbody tr")) == 4
        images = driver.execute_script(
            "return Array.from(document.images).map(i => "
            "[i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])"
        )
        assert len(images) == page.count("<img ")
        for complete, w, h, shown in images:  # every figure decoded and laid out
            assert complete and w > 100 and h > 100 and shown > 100, images
        text = driver.find_element("tag name", "body").text
        for heading in ("What was run", "Ranked table", "Figures", "Search diagnostics"):
            assert heading in text
        for cell in ("norm=layernorm,batch=b4", "norm=bln,batch=b16"):
            assert cell in text
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(height, 2400))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        if os.environ.get("BLN_DOCS_SCREENSHOTS"):  # refresh docs/report.png on request
            shutil.copy(shot, ROOT / "docs" / "report.png")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
