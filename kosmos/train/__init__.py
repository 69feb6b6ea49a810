"""Training: ``config.py`` (the train config) -> ``setup.py`` (processes, tokenizer, model, optimizer) ->
``run.py`` (one run from config to final checkpoint) -> ``loop.py`` (the step loop) with ``state.py``
(checkpoints of the run: weights, optimizer, loader and RNG state) and ``log.py`` (metrics.jsonl, TensorBoard).
"""
