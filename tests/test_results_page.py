"""docs/results.md and the README's results tables are what the committed result files render to."""
import json
import re
from pathlib import Path

import pytest

from faiss_rqmoe.bench import cli, results_page

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "notebooks" / "results"
README = ROOT / "README.md"
RENDER_HINT = "stale: run python -m faiss_rqmoe.bench render and commit docs/ and README.md"


def test_committed_results_page_is_current(tmp_path):
    results_page.render(RESULTS, tmp_path, readme=None, figures=False)
    committed = (ROOT / "docs" / "results.md").read_text()
    assert (tmp_path / "results.md").read_text() == committed, f"docs/results.md is {RENDER_HINT}"


def test_readme_tables_are_current():
    text = README.read_text()
    assert results_page.readme_with_tables(text, results_page.load_results(RESULTS)) == text, \
        f"README.md's results tables are {RENDER_HINT}"


def test_every_result_file_is_on_the_page():
    page = (ROOT / "docs" / "results.md").read_text()
    for path in RESULTS.rglob("*.json"):
        assert f"../notebooks/results/{path.relative_to(RESULTS).as_posix()})" in page, path


def test_readme_stays_short_and_shows_its_figures():
    text = README.read_text()
    assert len(text.encode()) <= 25_000, "README.md should stay within 25 KB: move detail to docs/"
    figures = re.findall(r"!\[[^\]]*\]\((docs/figures/[^)]+\.svg)\)", text)
    assert len(figures) == 2
    for figure in figures:
        assert (ROOT / figure).is_file(), figure
    for name in results_page.README_TABLES:
        assert f"<!-- results:{name} -->" in text


def test_readme_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(((?:docs|notebooks)/[^)#]+)\)", text) + re.findall(r"^\[[^\]]+\]: (\S+)$", text,
                                                                                        re.MULTILINE):
        assert (ROOT / target).exists(), target


def test_figures_render_as_reproducible_svg(tmp_path):
    pytest.importorskip("matplotlib")
    results = results_page.load_results(RESULTS)
    first = results_page.draw_recall_qps(results, tmp_path / "a.svg").read_text()
    second = results_page.draw_recall_qps(results, tmp_path / "b.svg").read_text()
    assert first.startswith("<?xml") and "<svg" in first
    assert first == second  # fixed ids and no date: re-rendering leaves the committed file unchanged
    assert "<svg" in results_page.draw_decode_speed(results, tmp_path / "c.svg").read_text()


def test_render_command_writes_and_checks(tmp_path):
    results_dir, docs = tmp_path / "results", tmp_path / "docs"
    results_dir.mkdir()
    for name in {name for spec in (results_page.README_CODEC_ROWS, results_page.README_PRETRAINED_ROWS)
                 for files, _ in spec for name in files} | {spec[0] for spec in results_page.README_SEARCH_ROWS} \
            | {spec[0] for spec in results_page.README_SPEED_ROWS}:
        (results_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (results_dir / name).write_text((RESULTS / name).read_text())
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- results:{n} -->\nold\n<!-- /results:{n} -->\n" for n in results_page.README_TABLES))
    args = ["render", "--results", str(results_dir), "--docs", str(docs), "--readme", str(readme)]
    assert cli.main(args + ["--check"]) == 1
    assert cli.main(args + ["--no-figures"]) == 0
    assert cli.main(args + ["--check"]) == 0
    assert "old" not in readme.read_text() and "| data |" in readme.read_text()
    assert (docs / "results.md").is_file()


def test_a_missing_marker_or_file_is_named():
    with pytest.raises(ValueError, match="results:codec"):
        results_page.replace_between_markers("no markers here", {"codec": "| table |"})
    with pytest.raises(KeyError, match="search_default_8B_h200.json"):
        results_page.readme_search_table({})


def test_numbers_are_formatted_as_the_readme_writes_them():
    assert results_page.fmt_mse(21991.4) == "21 991" and results_page.fmt_mse(0.17651) == "0.1765"
    assert results_page.fmt_rate(61_312.0) == "61 300" and results_page.fmt_rate(24_429_263.0) == "24.4 M"
    assert results_page.fmt_rate(612.4) == "612" and results_page.fmt_recall(0.4705) == "0.470"
    assert results_page.short_device("NVIDIA H100 80GB HBM3") == "H100"
    assert results_page.short_device("cpu (x86_64, 2 cores)") == "2 CPU cores"


def test_a_result_that_is_not_a_benchmark_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="not a benchmark result"):
        results_page.load_results(tmp_path)
