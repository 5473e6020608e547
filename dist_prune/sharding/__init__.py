"""The only package that touches DeepSpeed: ZeRO-3 partitions and their local views
(partition.py), DeepSpeed engines put on the model for one stage and taken off again, and the
process groups (engine.py)."""
