"""make_results_table.py: test_results.txt files of several runs -> one Markdown table."""

from pathlib import Path

import pytest

import make_results_table


def write_run(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "test_results.txt").write_text(text)
    return directory


def test_table_has_one_row_per_run_with_percentages(tmp_path):
    a = write_run(tmp_path / "rag-original", "test_em: 0.25\ntest_f1: 0.5\ntest_loss: 1.25\ntest_recall@5: 0.4\n")
    b = write_run(tmp_path / "rag-end2end", "test_em: 0.3125\ntest_f1: 0.6\ntest_loss: 1.0\n")
    out = tmp_path / "table.md"
    table = make_results_table.main(make_results_table.parse_args([str(a), str(b), "--output", str(out)]))
    assert out.read_text() == table
    lines = table.splitlines()
    assert lines[0] == "| run | EM | F1 | recall@5 | loss |"
    assert lines[2] == "| rag-original | 25.00 | 50.00 | 40.00 | 1.250 |"
    assert lines[3] == "| rag-end2end | 31.25 | 60.00 | - | 1.000 |"  # no gold passages: a dash


def test_names_and_errors_name_the_file_and_line(tmp_path):
    run = write_run(tmp_path / "r", "test_em: 0.5\ntest_f1 0.5\n")
    with pytest.raises(ValueError, match=r"r/test_results\.txt:2: expected `name: number`"):
        make_results_table.read_test_results(run)
    with pytest.raises(FileNotFoundError, match=r"missing/test_results\.txt not found"):
        make_results_table.read_test_results(tmp_path / "missing")
    with pytest.raises(SystemExit):
        make_results_table.parse_args([str(run), "--names", "a", "b"])
