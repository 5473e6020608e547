"""finetune.data.generated_windows: tuning windows sampled from the dense model itself."""

from __future__ import annotations

import re

import pytest
import torch

import dist_prune.generated as generated
from dist_prune.cli import main
from dist_prune.generated import sample, sampled_windows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_incremental_sampling_draws_what_a_full_forward_at_every_step_would(tiny_llama):
    """The KV cache path must sample from the same distributions as re-reading the whole prefix:
    the same generator draws give the same tokens."""
    model = _model(tiny_llama)
    special = torch.tensor([0, 1])
    got = sample(model, 3, 12, special, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[special] = False
    ordinary = allowed.nonzero().squeeze(1)
    ids = ordinary[torch.randint(len(ordinary), (3, 1), generator=generator)]
    with torch.no_grad():
        for _ in range(11):
            logits = model(ids).logits[:, -1].float().masked_fill(~allowed, float("-inf"))
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], 1)
    assert torch.equal(got, ids)


def test_windows_have_the_asked_shape_no_special_token_and_depend_on_the_seed_only(tiny_llama, cache,
                                                                                  monkeypatch):
    monkeypatch.setattr(generated, "BATCH", 4)  # 10 windows: batches of 4, 4 and 2
    special = [0, 5, 9]
    first = sampled_windows(tiny_llama, 10, 16, 3, special_ids=special, fingerprint="a")
    assert first.shape == (10, 16) and first.dtype == torch.long
    assert not torch.isin(first, torch.tensor(special)).any()
    assert len({tuple(w.tolist()) for w in first}) == 10  # every window its own
    again = sampled_windows(tiny_llama, 10, 16, 3, special_ids=special, fingerprint="b")  # not cached
    assert torch.equal(first, again)
    other = sampled_windows(tiny_llama, 10, 16, 4, special_ids=special, fingerprint="a")
    assert not torch.equal(first, other)
    assert sorted(p.suffix for p in (cache / "generated").iterdir()) == [".safetensors"] * 3  # no temporary file


def test_the_same_model_and_settings_come_from_the_cache(tiny_llama, cache, monkeypatch):
    first = sampled_windows(tiny_llama, 3, 8, 0, special_ids=[0], fingerprint="sha")
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("sampled again although the cache holds the windows"))
    assert torch.equal(sampled_windows(tiny_llama, 3, 8, 0, special_ids=[0], fingerprint="sha"), first)


def _small(model, text) -> list[str]:
    return [f"model.path={model}", f"data.calibration.path={text}", "data.calibration.seq_len=16",
            "data.calibration.num_samples=2", f"eval.path={text}", "eval.seq_len=16", "eval.num_windows=2",
            "finetune.steps=3", "finetune.data.seq_len=16"]


def test_a_dry_run_names_the_sampled_windows_and_samples_nothing(tiny_llama, text_file, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(generated, "sampled_windows", lambda *a, **k: pytest.fail("a dry run sampled"))
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "finetune.data.generated_windows=40",
                 "registry.enabled=false"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    assert rows["fine-tuning"] == "3 steps, 40 windows x 16 tokens sampled from the dense model"


def test_prepare_samples_the_tuning_windows(tiny_llama, text_file, tmp_path, cache, monkeypatch):
    from dist_prune.config import load_config
    from dist_prune.job import prepare

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*_small(tiny_llama, text_file), "finetune.data.generated_windows=5",
                             "registry.enabled=false", "seed=7"])
    job = prepare(cfg)
    assert job.training.shape == (5, 16)
    from transformers import AutoTokenizer

    special = AutoTokenizer.from_pretrained(tiny_llama).all_special_ids
    assert not torch.isin(job.training, torch.tensor(special)).any()
    assert torch.equal(job.training, prepare(cfg).training)  # the cached windows


def test_generated_windows_and_a_tuning_text_are_one_or_the_other_unless_mixed(tiny_llama, text_file, capsys):
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "finetune.data.generated_windows=40",
                 f"finetune.data.path={text_file}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finetune.data.generated_windows=40" in err and "set one of them" in err, err
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "finetune.data.generated_share=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finetune.data.generated_share=0.5" in err and "generated_windows > 0" in err
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "finetune.data.generated_share=0"]) == 2
    assert "finetune.data.generated_share" in capsys.readouterr().err
    for wrong, named in [(["finetune.distill.windows=sampled", "finetune.distill.beta=0.5"], "generated_windows > 0"),
                         (["finetune.distill.windows=sampled", "finetune.data.generated_windows=4"],
                          "finetune.distill.beta > 0"),
                         (["finetune.distill.windows=text"], "allowed: all, sampled")]:
        assert main(["run", "--dry-run", *_small(tiny_llama, text_file), *wrong]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "finetune.distill.windows" in err and named in err, err


def test_prepare_mixes_the_text_and_the_sampled_windows(tiny_llama, text_file, tmp_path, cache, monkeypatch,
                                                        capsys):
    """generated_share < 1: the text's windows, then the sampled ones (the loop's second pool)."""
    from dist_prune.config import load_config
    from dist_prune.job import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    mixed = [*_small(tiny_llama, text_file), "finetune.data.generated_windows=3", "finetune.data.generated_share=0.5",
             f"finetune.data.path={text_file}", "registry.enabled=false"]
    assert main(["run", "--dry-run", *mixed, "finetune.distill.beta=1", "finetune.distill.windows=sampled"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    text_only = prepare(load_config(None, [*_small(tiny_llama, text_file), f"finetune.data.path={text_file}",
                                           "registry.enabled=false"]), sample=False).training
    assert rows["fine-tuning"] == (f"3 steps, {text_only.shape[0]} windows x 16 tokens from {text_file} + 3 windows x "
                                   "16 tokens sampled from the dense model (50% of each step); distilled from the dense "
                                   "model on the sampled windows (beta 1, T 2)"), rows
    job = prepare(load_config(None, mixed))
    assert job.training.shape == (text_only.shape[0] + 3, 16)
    assert torch.equal(job.training[:-3], text_only)
    alone = prepare(load_config(None, [*_small(tiny_llama, text_file), "finetune.data.generated_windows=3",
                                       "registry.enabled=false"]))
    assert torch.equal(job.training[-3:], alone.training)  # the same sampled windows


def test_generated_calibration_is_planned_sampled_and_exclusive_of_a_calibration_text(
        tiny_llama, text_file, tmp_path, cache, monkeypatch, capsys):
    from dist_prune.config import load_config
    from dist_prune.job import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plain = [a for a in _small(tiny_llama, text_file) if not a.startswith("data.calibration.path")]
    assert main(["run", "--dry-run", *plain, "data.calibration.generated=true", "registry.enabled=false"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    assert rows["calibration"] == "2 windows x 16 tokens sampled from the dense model"
    assert not (cache / "generated").exists()  # the dry run sampled nothing

    job = prepare(load_config(None, [*plain, "data.calibration.generated=true", "registry.enabled=false"]))
    assert job.calibration.shape == (2, 16)
    assert capsys.readouterr().err.startswith("sample calibration windows from the dense model: 2/2 in ")
    assert main(["run", "--dry-run", *_small(tiny_llama, text_file), "data.calibration.generated=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.calibration.generated=true" in err and "set one of them" in err, err


def test_mixed_calibration_reads_the_text_then_samples_the_rest(tiny_llama, text_file, tmp_path, cache,
                                                                monkeypatch, capsys):
    """data.calibration.generated_share=0.5 of 4 windows: the first 2 of the text's seeded offsets
    (the windows a text-only job reads first), then the 2 windows a job sampling 2 samples."""
    from dist_prune.config import load_config
    from dist_prune.job import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = [*_small(tiny_llama, text_file), "data.calibration.num_samples=4", "registry.enabled=false"]
    no_path = [a for a in base if not a.startswith("data.calibration.path")]
    mixed = [*base, "data.calibration.generated=true", "data.calibration.generated_share=0.5"]
    assert main(["run", "--dry-run", *mixed]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    assert rows["calibration"] == (f"2 windows x 16 tokens from {text_file} + 2 windows x 16 tokens sampled "
                                   "from the dense model")
    job = prepare(load_config(None, mixed))
    text_only = prepare(load_config(None, base)).calibration
    sampled_only = prepare(load_config(None, [*no_path, "data.calibration.generated=true",
                                              "data.calibration.num_samples=2"])).calibration
    assert job.calibration.shape == (4, 16)
    assert torch.equal(job.calibration[:2], text_only[:2]) and torch.equal(job.calibration[2:], sampled_only)
    capsys.readouterr()
    for wrong, named in [(["data.calibration.generated_share=0.5"], "set data.calibration.generated=true"),
                         (["data.calibration.generated=true", "data.calibration.generated_share=0.1"],
                          "leaves no window to one of the two sources")]:
        assert main(["run", "--dry-run", *base, *wrong]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "data.calibration.generated_share" in err and named in err, err


def test_the_benchmarks_sample_what_a_run_samples(tiny_llama, text_file, tmp_path, cache, monkeypatch):
    """benchmarks/_ranks.py hands the ranks windows directly: for a job that samples, they must be
    the windows `dist-prune run` would sample (job.prepare), the same for calibration and tuning."""
    import sys
    from pathlib import Path

    from dist_prune.config import load_config
    from dist_prune.job import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("_ranks", None)
    from _ranks import with_sampled_windows

    overrides = [a for a in _small(tiny_llama, text_file) if not a.startswith("data.calibration.path")]
    overrides += ["data.calibration.generated=true", "finetune.data.generated_windows=3", "registry.enabled=false"]
    plain = {"model": str(tiny_llama), "calibration": None, "training": None}
    assert with_sampled_windows(plain, overrides[:-3]) is plain  # nothing to sample: the data as given
    data = with_sampled_windows(plain, overrides)
    job = prepare(load_config(None, overrides))
    assert data["calibration"].shape == (2, 16) and torch.equal(data["calibration"], job.calibration)
    assert data["training"].shape == (3, 16) and torch.equal(data["training"], job.training)
    mixed = [*overrides, "finetune.data.generated_share=0.5", f"finetune.data.path={text_file}"]
    job = prepare(load_config(None, mixed))
    data = with_sampled_windows({**plain, "training": job.training[:-3]}, mixed)  # the text, as tokens() gives it
    assert torch.equal(data["training"], job.training)  # then the same samples, in the same rows
    mixed = [*overrides, f"data.calibration.path={text_file}", "data.calibration.num_samples=4",
             "data.calibration.generated_share=0.5"]
    job = prepare(load_config(None, mixed))
    text = prepare(load_config(None, [*mixed[:-1], "data.calibration.generated=false"]))  # the text's alone
    data = with_sampled_windows({**plain, "calibration": text.calibration}, mixed)  # 4 text windows given
    assert data["calibration"].shape == (4, 16) and torch.equal(data["calibration"], job.calibration)
