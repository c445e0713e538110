"""Evaluation: generate on held-out rows, score them (exact match, JSON / schema validity, field F1,
chrF, perplexity), compare with the base model, gate, write report.json / report.md, and the
lm-evaluation-harness bridge. May import every stage above it (up to merge: it refreshes the model card).
"""
