"""Training: trl's SFTTrainer configured from the typed config (sft.py), the adapter's initialisation and
atomic save (adapter.py), atomic resumable checkpoints, metrics / console / signal callbacks, the memory plan
printed before a run, loss plots. May import everything above it: errors, paths, files, distributed, config,
data, models, generate.
"""
