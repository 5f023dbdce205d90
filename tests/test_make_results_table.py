"""tools/make_results_table.py: test_results.txt files of several runs -> one Markdown table."""

from pathlib import Path

import pytest

from rag_end2end.evaluation import results_table as make_results_table


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


def test_runs_of_one_name_make_one_row_with_mean_and_spread(tmp_path):
    runs = [
        write_run(tmp_path / f"seed{i}", f"test_em: {em}\ntest_recall@1: {r}\n")
        for i, (em, r) in enumerate([(0.1, 0.5), (0.2, 0.7), (0.3, 0.6)])
    ]
    zero = write_run(tmp_path / "zero", "test_em: 0.0\ntest_recall@1: 0.4\n")
    argv = [str(zero), *map(str, runs), "--names", "zero-shot", "end2end", "end2end", "end2end"]
    lines = make_results_table.main(make_results_table.parse_args(argv)).splitlines()
    assert lines[0] == "| run | runs | EM | recall@1 |"
    assert lines[2] == "| zero-shot | 1 | 0.00 | 40.00 |"
    assert lines[3] == "| end2end | 3 | 20.00 ± 10.00 | 60.00 ± 10.00 |"  # mean ± sample standard deviation
