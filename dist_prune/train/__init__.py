"""Sparse-NEFT fine-tuning with the masks kept: the loop (loop.py) over its state (state.py),
mask keeping per ZeRO stage (masks.py), NEFTune noise (neftune.py), schedules (schedule.py) and
checkpoints to resume from (resume.py). Imports run one way: state, masks, neftune, schedule <-
resume <- loop.
"""
