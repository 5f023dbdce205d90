"""rag_end2end.files: the package's one way to write files atomically (a temporary sibling renamed into place)."""

import errno
import os
import re

import pytest

from rag_end2end.files import atomic_write, atomic_write_text, atomic_writes, remove_orphaned_temporaries


def test_a_file_appears_whole_at_the_end_of_the_block_under_a_temporary_name_until_then(tmp_path):
    path = tmp_path / "stats.json"
    with atomic_write(path, "the stats") as tmp:
        tmp.write_text("{}")
        assert not path.exists()
        assert tmp.parent == tmp_path and re.fullmatch(rf"stats\.json\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
    assert path.read_text() == "{}" and os.listdir(tmp_path) == ["stats.json"]
    atomic_write_text(path, "replaced")  # a file is replaced
    assert path.read_text() == "replaced" and os.listdir(tmp_path) == ["stats.json"]


def test_a_failed_write_leaves_nothing_and_its_error_names_the_file(tmp_path):
    path = tmp_path / "index.faiss"
    with pytest.raises(OSError) as caught, atomic_write(path, "KB index") as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk raises, naming no file
    assert caught.value.errno == errno.ENOSPC and f"writing KB index {path} failed" in str(caught.value)
    assert os.listdir(tmp_path) == []
    # The error keeps its kind, so that callers can still tell a missing file from a full disk
    with (
        pytest.raises(FileNotFoundError, match=f"writing KB index {path} failed: no adapter"),
        atomic_write(path, "KB index"),
    ):
        raise FileNotFoundError("no adapter")
    with pytest.raises(PermissionError, match="writing KB index .* failed") as caught, atomic_write(path, "KB index"):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    assert caught.value.errno == errno.EACCES and caught.value.filename == str(path)


def test_several_files_are_renamed_only_once_all_are_written(tmp_path):
    paths = [tmp_path / "train.source", tmp_path / "train.target"]
    with pytest.raises(ValueError, match="bad line"), atomic_writes(paths, "the data") as tmps:
        tmps[0].write_text("question\n")
        raise ValueError("bad line")
    assert os.listdir(tmp_path) == []
    with atomic_writes(paths, "the data") as tmps:
        for tmp, text in zip(tmps, ("question\n", "answer\n")):
            tmp.write_text(text)
    assert [p.read_text() for p in paths] == ["question\n", "answer\n"]


def test_replace_false_refuses_what_exists_and_a_given_temporary_directory_is_renamed(tmp_path):
    final, staging = tmp_path / "v0001", tmp_path / "v0001.tmp-staging"
    staging.mkdir()
    (staging / "READY.json").write_text("{}")
    with atomic_write(final, "KB version", replace=False, temporary=staging) as tmp:
        assert tmp == staging
    assert (final / "READY.json").is_file() and not staging.exists()
    with pytest.raises(FileExistsError, match="v0001 already exists"), atomic_write(final, replace=False) as tmp:
        tmp.mkdir()
    assert os.listdir(tmp_path) == ["v0001"]


def test_what_an_interrupted_write_left_is_recognised_by_its_name(tmp_path):
    """A temporary of a process that is gone goes; a live process's stays (remove_orphaned_temporaries)."""
    with atomic_write(tmp_path / "mine.txt") as live:
        live.write_text("being written")
        gone = tmp_path / "other.txt.tmp-999999999-0123abcd"  # no such pid
        gone.write_text("left by a killed writer")
        assert remove_orphaned_temporaries(tmp_path) == [gone]
        assert live.exists()
    # `of`: only the temporaries of one name (an export's parent directory is the user's)
    theirs, ours = tmp_path / "other.txt.tmp-999999999-0123abcd", tmp_path / "export.tmp-999999999-0123abcd"
    theirs.write_text("x")
    ours.mkdir()
    assert remove_orphaned_temporaries(tmp_path, of="export") == [ours] and theirs.exists()


def test_a_removal_stopped_half_way_leaves_no_half_directory_under_its_name(tmp_path, monkeypatch):
    """remove_tree renames aside first: a reader finds the directory whole or not at all."""
    import shutil

    from rag_end2end import files

    path = tmp_path / "checkpoint40"
    path.mkdir()
    for name in ("rag_settings.json", "kb_version.json"):
        (path / name).write_text("{}")

    def stops_half_way(directory):  # what a crash (or a full disk) in the middle of rmtree leaves
        (directory / "rag_settings.json").unlink()
        raise OSError(errno.EIO, "stopped")

    monkeypatch.setattr(shutil, "rmtree", stops_half_way)
    with pytest.raises(OSError, match="stopped"):
        files.remove_tree(path)
    (left,) = tmp_path.iterdir()
    assert not path.exists() and re.fullmatch(rf"checkpoint40\.tmp-{os.getpid()}-[0-9a-f]{{8}}", left.name)
    monkeypatch.undo()
    files.remove_tree(tmp_path / left.name)
    assert list(tmp_path.iterdir()) == []
