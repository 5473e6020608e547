"""The only package that touches DeepSpeed: ZeRO-3 partitions and their local views
(partition.py), DeepSpeed engines put on the model for one stage and taken off again and the
process groups (engine.py), and one training adapter per ZeRO stage (training.py).

deepspeed is imported inside the functions that use it, never at module level: it picks its
accelerator once, at import, from what it finds, and a CPU job on a GPU machine must set
DS_ACCELERATOR=cpu first (worker.ray_train_loop does), or zero.Init would put the partitions on a
GPU next to gloo.
"""
