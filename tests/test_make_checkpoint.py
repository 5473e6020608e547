"""benchmarks/make_checkpoint.py writes a loadable, sharded, Llama-shaped checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_checkpoint_loads(tmp_path):
    out = tmp_path / "synthetic"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), str(out),
                    "--params", "3e7", "--layers", "2", "--vocab", "2000", "--shard-size", "8MB"],
                   check=True, capture_output=True)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and str(model.dtype) == "torch.bfloat16"
    assert not list(tmp_path.glob(".*"))  # no staging leftovers
