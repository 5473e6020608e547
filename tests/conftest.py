"""Shared fixtures: tiny random Llama checkpoints with their own tokenizer (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIST_PRUNE_DATA", ROOT.parent / "shared" / "data"))
from dist_prune.io.checkpoint import configure_jit_builds# noqa: E402

configure_jit_builds()

TEXT = ("The quick brown fox jumps over the lazy dog. Pruning removes weights from a network; "
        "the remaining weights carry the model. A threshold agreed by all workers decides which "
        "weights go. Every worker holds one slice of every weight and scores only that slice. ") * 40


def sample_text() -> str:
    """Calibration / eval text for tiny models: WikiText-2 if present, else a fixed paragraph."""
    wiki = DATA / "wikitext-2" / "valid.txt"
    return wiki.read_text()[:200_000] if wiki.is_file() else TEXT


def make_tokenizer(directory: Path, text: str, vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on `text`, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


def make_tiny_llama(directory: Path, *, layers: int = 2, hidden: int = 64, intermediate: int = 96,
                    heads: int = 4, kv_heads: int = 2, tie: bool = False, seed: int = 0,
                    max_shard_size: str | None = None) -> Path:
    """Save a random LlamaForCausalLM with a trained tokenizer; returns `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory, sample_text())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init is near-uniform in scale; give columns different scales so that
    # activation-aware scorers disagree with magnitude, as in trained models.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(torch.rand(p.shape[1]) * 2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(sample_text())
    return path


@pytest.fixture(scope="session")
def mlflow_servers(tmp_path_factory):
    """A plain and a basic-auth `mlflow server` on loopback, started together once per session
    (each test waits only for the one it uses) and killed with their process groups at the end."""
    from mlflow_servers import start, stop

    root = tmp_path_factory.mktemp("mlflow-servers")
    started = {}
    try:
        started["plain"] = start(root / "plain", auth=False)
        started["auth"] = start(root / "auth", auth=True)
        yield started
    finally:
        for server in started.values():
            stop(server.proc)


@pytest.fixture(scope="session")
def plain_mlflow(mlflow_servers):
    from mlflow_servers import wait_healthy

    return wait_healthy(mlflow_servers["plain"])


@pytest.fixture(scope="session")
def secured_mlflow(mlflow_servers):
    from mlflow_servers import wait_healthy

    return wait_healthy(mlflow_servers["auth"])
