"""Evaluation and inference on trained models: ``grounding.py`` (loss and phrase-grounding accuracy on held-out
shards), ``generate.py`` (grounded generation for one image) and ``weight_diff.py`` (which weights a run changed).
"""
