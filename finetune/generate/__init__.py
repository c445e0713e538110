"""Generation: batched greedy / sampled decoding with the model's own chat template and stop tokens,
JSON-schema-constrained decoding (llguidance), prompt files, and the `finetune generate` run. Used by merge
(parity), evaluation and export (verification). May import: errors, paths, files, distributed, config,
data, models.
"""
