"""Loading straight into ZeRO-3 partitions: each rank reads only its slice, and the
gathered model equals the checkpoint exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from multirank import run_on_ranks


def _load_and_gather(model_dir: str, dtype_name: str) -> dict:
    from dist_prune.io.checkpoint import open_checkpoint
    from dist_prune.sharding.partition import DTYPES, build_partitioned_model, gathered, local_range

    model = build_partitioned_model(Path(model_dir), open_checkpoint(Path(model_dir)), DTYPES[dtype_name])
    full, local = {}, {}
    for name, p in model.named_parameters():
        local[name] = (local_range(p), p.ds_tensor.numel(), p.ds_tensor.dtype)
        with gathered([p]):
            full[name] = p.data.clone()
    return {"full": full, "local": local, "tied": model.lm_head.weight is model.model.embed_tokens.weight}


@pytest.fixture(scope="module")
def sharded_tied_llama(tmp_path_factory) -> Path:
    # several safetensors shards + index, tied embeddings, odd sizes (not multiples of W)
    return make_tiny_llama(tmp_path_factory.mktemp("sharded"), hidden=48, intermediate=72, heads=3,
                           kv_heads=1, tie=True, max_shard_size="20KB")


def test_partitions_equal_checkpoint_on_1_and_2_ranks(sharded_tied_llama):
    assert (sharded_tied_llama / "model.safetensors.index.json").is_file()
    raw = {}
    for f in sharded_tied_llama.glob("*.safetensors"):
        raw.update(load_file(f))
    for world in (1, 2):
        results = run_on_ranks(_load_and_gather, world, str(sharded_tied_llama), "float32")
        for rank, res in enumerate(results):
            assert res["tied"]
            for name, tensor in res["full"].items():
                assert tensor.dtype == torch.float32
                assert torch.equal(tensor, raw[name]), (world, rank, name)
            for name, ((start, stop), size, dtype) in res["local"].items():
                numel = raw[name].numel()
                ps = -(-numel // world)  # ZeRO-3: ceil(numel / W) per rank, padded
                assert size == ps and dtype == torch.float32
                assert (start, stop) == (min(rank * ps, numel), min((rank + 1) * ps, numel))


def test_bfloat16_partitions(tiny_llama):
    res = run_on_ranks(_load_and_gather, 1, str(tiny_llama), "bfloat16")[0]
    raw = load_file(tiny_llama / "model.safetensors")
    for name, tensor in res["full"].items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, raw[name].to(torch.bfloat16)), name


# A fresh interpreter: the failure needs torch._dynamo to be imported for the first time while
# deepspeed.zero.Init has replaced Tensor.__new__. Inside a long pytest process dynamo is often
# imported already, and the build would pass by accident.
FRESH_BUILD = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
from pathlib import Path
import torch, deepspeed
from safetensors.torch import load_file
from dist_prune.io.checkpoint import open_checkpoint
from dist_prune.sharding.partition import build_partitioned_model, gathered

deepspeed.init_distributed(dist_backend="gloo")
assert "torch._dynamo" not in sys.modules, "dynamo already imported: this test would prove nothing"
model_dir = Path(sys.argv[1])
model = build_partitioned_model(model_dir, open_checkpoint(model_dir), torch.float32)
raw = load_file(model_dir / "model.safetensors")
for name, p in model.named_parameters():
    with gathered([p]):
        assert torch.equal(p.data, raw[name]), name
print("built", type(model).__name__, len(raw))
torch.distributed.destroy_process_group()
"""


def _tiny_gpt2(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64,
                               vocab_size=128)).save_pretrained(directory)
    return directory


@pytest.mark.smoke
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_partitioned_build_in_a_fresh_process(arch, tiny_llama, tmp_path):
    """transformers 5.24+ imports modeling_utils (and with it torch._dynamo) inside zero.Init;
    so does from_config for an architecture not imported yet (gpt2 on 5.23). Both raised
    `TypeError: Signature mismatch ... tensor_pynew` until the build imported them first."""
    import subprocess
    import sys

    from multirank import free_port

    model_dir = tiny_llama if arch == "llama" else _tiny_gpt2(tmp_path / "gpt2")
    proc = subprocess.run([sys.executable, "-c", FRESH_BUILD, str(model_dir), str(free_port())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built" in proc.stdout


def _whole_copy_logits(model_dir: str) -> dict:
    from dist_prune.io.checkpoint import open_checkpoint
    from dist_prune.sharding.partition import build_partitioned_model
    from dist_prune.sharding.whole import whole_copy

    model = build_partitioned_model(Path(model_dir), open_checkpoint(Path(model_dir)), torch.float32)
    whole = whole_copy(model)
    ids = torch.arange(24).reshape(2, 12) % whole.config.vocab_size
    with torch.no_grad():
        logits = whole(input_ids=ids, use_cache=False).logits
    return {"logits": logits, "ids": ids,
            "tied": whole.get_output_embeddings().weight is whole.get_input_embeddings().weight}


def test_whole_copy_of_a_tied_model_computes_what_the_checkpoint_does(sharded_tied_llama):
    """The whole copy that stage 0 (data parallel) and ZeRO 2 train: with tied embeddings
    (SmolLM2) transformers' from_config under no_init_weights left lm_head untied and
    uninitialised, so every step trained against garbage logits (loss 10.8 = ln(vocab))."""
    from transformers import AutoModelForCausalLM

    result = run_on_ranks(_whole_copy_logits, 2, str(sharded_tied_llama))[0]
    reference = AutoModelForCausalLM.from_pretrained(sharded_tied_llama)
    with torch.no_grad():
        expected = reference(input_ids=result["ids"], use_cache=False).logits
    assert result["tied"]
    torch.testing.assert_close(result["logits"], expected)
