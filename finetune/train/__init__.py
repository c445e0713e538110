"""Training: trl's SFTTrainer configured from the typed config, atomic resumable checkpoints, metrics /
signal callbacks, the memory plan printed before a run, loss plots. May import everything above it:
errors, paths, files, distributed, config, data, models, generate.
"""
