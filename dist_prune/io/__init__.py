"""Files in and out: safetensors shards (shards.py), the checkpoint a job reads (checkpoint.py),
the export it writes (export.py, with the compressed formats of compressed.py) and its
verification (verify.py). Imports run one way: shards <- compressed <- export, verify; checkpoint.
"""
