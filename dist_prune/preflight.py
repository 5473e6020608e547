"""What the driver checks of a model directory before any worker starts: config.json, the
architecture, the tensors against what config.json implies, and the tokenizer files.

A worker would find each of these problems too, but only after Ray, DeepSpeed and the
process group have started (a minute), and as a traceback from deep inside transformers or
`deepspeed.zero.Init`. Here each is one line naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dist_prune.errors import UserError
from dist_prune.io.checkpoint import WEIGHT_DTYPES, Checkpoint
from dist_prune.layerwise import SUPPORTED_EXAMPLES, runs_layer_by_layer

# What AutoTokenizer builds a fast tokenizer from, without sentencepiece or tiktoken (which the
# lock does not install): tokenizers' own file, or a byte-level BPE's vocabulary and merges.
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def read_config(model_dir: Path) -> dict:
    """config.json of `model_dir` as an object with a model_type; UserError naming the file."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    if not isinstance(config.get("model_type"), str):
        raise UserError(f"{path} has no model_type (a Hugging Face causal LM's config.json names "
                        "its architecture there, e.g. \"llama\")")
    return config


def check_tokenizer_files(model_dir: Path) -> None:
    """The files a tokenizer loads from, present (a missing one makes AutoTokenizer raise a
    ValueError that asks for sentencepiece)."""
    if not any(all((model_dir / f).is_file() for f in files) for files in TOKENIZER_SETS):
        raise UserError(f"model.path {model_dir} has no tokenizer: expected "
                        + " or ".join(" with ".join(files) for files in TOKENIZER_SETS))


def load_tokenizer(model_dir: Path, trust_remote_code: bool):
    """AutoTokenizer of `model_dir`; a file it cannot parse is one line naming the directory."""
    from transformers import AutoTokenizer  # lazy: only the driver's prepare() needs transformers

    check_tokenizer_files(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - sorted below: what a tokenizer file that lies makes it raise
        # json's ValueError, KeyError for a missing section, TypeError, and the tokenizers package's
        # plain Exception ("Token `x` out of vocabulary"); anything else is a bug and keeps its traceback
        if not isinstance(e, (ValueError, KeyError, TypeError, OSError)) and type(e) is not Exception:
            raise
        if "trust_remote_code" in str(e):
            raise UserError(f"{model_dir} needs its own code to load; review it, then set "
                            "model.trust_remote_code=true") from None
        raise UserError(f"model.path {model_dir}: the tokenizer cannot be loaded "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None


def meta_model(model_dir: Path, trust_remote_code: bool) -> torch.nn.Module:
    """The model config.json describes, built on the meta device: names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy, as in load_tokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{model_dir / 'config.json'}: transformers cannot read it "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise UserError(f"{model_dir / 'config.json'}: model_type {config.model_type!r} is not a causal "
                        f"LM that transformers knows ({str(e).splitlines()[0]})") from None


def check_architecture(checkpoint: Checkpoint, trust_remote_code: bool) -> None:
    """Refuse, before any worker starts: an architecture the layer runner cannot run, a
    parameter config.json implies that the checkpoint lacks or holds in another shape, a tensor
    no parameter takes, and a weight of a dtype that cannot be scored as a float."""
    directory = checkpoint.directory
    config = directory / "config.json"
    model = meta_model(directory, trust_remote_code)
    model_type = model.config.model_type
    if not runs_layer_by_layer(model):
        raise UserError(f"{config}: model_type {model_type!r} ({type(model).__name__}) is not supported: "
                        "dist-prune runs a decoder whose layers are `.layers` followed by a final `.norm`, "
                        f"as in {', '.join(SUPPORTED_EXAMPLES)}")
    parameters = dict(model.named_parameters())  # a tied weight once, as the workers load it
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    for name, param in parameters.items():
        if name not in checkpoint.weight_map:
            raise UserError(f"model.path {directory}: config.json ({model_type}) implies a tensor {name}, "
                            "which no safetensors file holds")
        shard = checkpoint.weight_map[name]
        if checkpoint.shape(name) != tuple(param.shape):
            raise UserError(f"model.path {directory}: tensor {name} in {shard} has shape "
                            f"{list(checkpoint.shape(name))}, config.json implies {list(param.shape)}")
        stored = checkpoint.stored_dtype(name)
        if stored not in WEIGHT_DTYPES:
            raise UserError(f"model.path {directory}: tensor {name} in {shard} is {stored}; dist-prune "
                            f"scores and prunes weights stored as {', '.join(WEIGHT_DTYPES)} (a quantized or "
                            "integer checkpoint must be dequantized first)")
    for name, shard in checkpoint.weight_map.items():
        if name not in aliases and not any(p.search(name) for p in ignored):
            raise UserError(f"model.path {directory}: tensor {name} in {shard} belongs to no parameter of "
                            f"the {model_type} model config.json describes (a config.json of another model?)")
