"""dist-prune: distributed pruning of causal LMs on Ray + DeepSpeed ZeRO-3 workers."""

__version__ = "0.1.0"
