"""Merging: adapter + base (original 16-bit or nf4 round trip) streamed shard by shard into merged/,
the parity report (merged vs adapter), the model card. May import: errors, paths, files, distributed,
config, data, models, generate (parity generates), train (checkpoint metadata).
"""
