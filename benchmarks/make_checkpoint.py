"""Write a random Llama-shaped Hugging Face checkpoint of a requested size.

    .venv/bin/python benchmarks/make_checkpoint.py /data/llama-1b --params 1e9
    .venv/bin/python benchmarks/make_checkpoint.py /data/llama-7b --params 7e9 --shard-size 2GB

Tensors are generated and streamed to disk one at a time (dist-prune's own sharded
safetensors writer), so a 7B checkpoint needs memory for one tensor, not 14 GB. The
shapes follow Llama (grouped-query attention, SwiGLU MLP, untied head); a byte-level
BPE tokenizer trained on the built-in corpus makes it a complete, loadable checkpoint.
Weights are N(0, 0.02) with per-column scales, so activation-aware scorers have
something to find.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dist_prune.data import builtin_corpus
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import TensorSpec, parse_size

# (up to this many parameters: hidden, intermediate, heads, kv_heads), near Llama-family shapes
SHAPES = [(8e8, (1024, 2816, 16, 8)), (2e9, (2048, 5632, 16, 8)), (5e9, (3072, 8192, 24, 8)),
          (math.inf, (4096, 11008, 32, 8))]


def llama_config(params: float, vocab: int) -> dict:
    """A LlamaConfig dict whose parameter count is close to `params`."""
    hidden, inter, heads, kv = next(shape for limit, shape in SHAPES if params < limit)
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
            "rope_theta": 10000.0, "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}


def tensor_specs(cfg: dict, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of LlamaForCausalLM with these shapes, in state-dict order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), dtype)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [TensorSpec(p + "self_attn.q_proj.weight", (h, h), dtype),
                  TensorSpec(p + "self_attn.k_proj.weight", (kv, h), dtype),
                  TensorSpec(p + "self_attn.v_proj.weight", (kv, h), dtype),
                  TensorSpec(p + "self_attn.o_proj.weight", (h, h), dtype),
                  TensorSpec(p + "mlp.gate_proj.weight", (i, h), dtype),
                  TensorSpec(p + "mlp.up_proj.weight", (i, h), dtype),
                  TensorSpec(p + "mlp.down_proj.weight", (h, i), dtype),
                  TensorSpec(p + "input_layernorm.weight", (h,), dtype),
                  TensorSpec(p + "post_attention_layernorm.weight", (h,), dtype)]
    return specs + [TensorSpec("model.norm.weight", (h,), dtype),
                    TensorSpec("lm_head.weight", (v, h), dtype)]


def random_tensor(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if len(spec.shape) == 1:
        return torch.ones(spec.shape, dtype=spec.dtype)  # norm weights
    w = torch.randn(spec.shape, generator=generator) * 0.02
    w *= torch.rand(spec.shape[1], generator=generator) * 2  # uneven input columns
    return w.to(spec.dtype)


def write_tokenizer(directory: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 8000), special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_corpus()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--params", type=float, default=5e8, help="target parameter count")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = llama_config(args.params, args.vocab)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    dtype = getattr(torch, args.dtype)
    cfg["dtype"] = args.dtype
    specs = tensor_specs(cfg, dtype)
    total = sum(math.prod(s.shape) for s in specs)
    print(f"{args.dir}: {total / 1e9:.2f}B parameters, {cfg['num_hidden_layers']} layers, "
          f"hidden {cfg['hidden_size']}, {total * dtype.itemsize / 1e9:.1f} GB", flush=True)
    staging = args.dir.parent / f".{args.dir.name}.tokenizer"
    staging.mkdir(parents=True, exist_ok=True)
    write_tokenizer(staging, args.vocab)
    generator = torch.Generator().manual_seed(args.seed)
    with StreamingExport(args.dir, specs, parse_size(args.shard_size)) as writer:
        for spec in specs:
            writer.write(spec.name, random_tensor(spec, generator))
        writer.finish(cfg, sorted(staging.iterdir()), {"method": "none (synthetic dense checkpoint)",
                                                       "structure": "dense", "pruned_tensors": []})
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    print(json.dumps({"dir": str(args.dir), "parameters": total}))


if __name__ == "__main__":
    main()
