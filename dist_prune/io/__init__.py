"""Files in and out: safetensors shards (shards.py), the checkpoint a job reads (checkpoint.py),
the export formats (formats/), the export a job writes (export.py), its verification
(verify.py) and decompression (decompress.py). Imports run one way:
shards <- formats <- export, verify <- decompress;  shards <- checkpoint.
"""
