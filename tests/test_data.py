"""Data: windows, the built-in corpus, and too-short texts."""

from __future__ import annotations

import pytest
import torch

from dist_prune.data import (builtin_corpus, calibration_windows, eval_windows, read_text, shard)
from dist_prune.errors import UserError


def test_builtin_corpus_is_deterministic_and_large():
    text = builtin_corpus()
    assert text == builtin_corpus()
    assert len(text) > 200_000
    calibration, evaluation = read_text(None, role="calibration"), read_text(None, role="eval")
    assert calibration + evaluation == text  # disjoint split: eval is held out


def test_windows():
    ids = torch.arange(1000)
    cal = calibration_windows(ids, 8, 50, seed=3, source="x")
    assert cal.shape == (8, 50)
    assert torch.equal(cal, calibration_windows(ids, 8, 50, seed=3, source="x"))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 50)) for w in cal)  # contiguous
    ev = eval_windows(ids, 4, 100, source="x")
    assert torch.equal(ev.reshape(-1), torch.arange(400))
    assert torch.equal(torch.cat([shard(ev, r, 3) for r in range(3)]).sort(0).values, ev)


def test_too_short_texts():
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 2, 64, seed=0, source="cal.txt")
    with pytest.raises(UserError, match="eval.num_windows=4 x eval.seq_len=100"):
        eval_windows(torch.arange(399), 4, 100, source="e.txt")


def test_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        read_text(str(tmp_path / "empty.txt"), role="calibration")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="cannot be read as UTF-8"):
        read_text(str(tmp_path / "bin.txt"), role="eval")


def test_training_text_from_a_datasets_directory(tmp_path):
    import datasets

    from dist_prune.data import read_training_text, training_windows

    rows = {"text": ["first document", "", "second document"], "id": [1, 2, 3]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    assert read_training_text(str(tmp_path / "dd")) == "first document\n\nsecond document"
    assert read_training_text(str(tmp_path / "ds")) == "first document\n\nsecond document"
    for kwargs, message in (({"split": "validation"}, "finetune.data.split 'validation'"),
                            ({"text_column": "body"}, "finetune.data.text_column 'body'")):
        with pytest.raises(UserError, match=message):
            read_training_text(str(tmp_path / "dd"), **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a `datasets` directory"):
        read_training_text(str(tmp_path / "empty"))
    windows = training_windows(torch.arange(10), 4, source="t")
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UserError, match="fewer than one window"):
        training_windows(torch.arange(3), 4, source="t")
