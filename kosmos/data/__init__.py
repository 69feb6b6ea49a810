"""How a shard becomes a batch, in data-flow order:

``shards.py`` (shard lists, completeness, rank/worker assignment) -> ``sources.py`` (read WebDataset samples, or
parquet rows through ``parquet.py``; decode, mix sources) -> ``transform.py`` (the image in the model's square frame,
CLIP normalisation) -> ``location.py``
(boxes <-> the 32 x 32 location-token grid) -> ``tokenizer.py`` (text pieces, special and location tokens) ->
``sequence.py`` (a GRIT record -> token ids, image slots and loss targets) -> ``collate.py`` (padding or packing
rows) -> ``loader.py`` (the DataLoader with its resumable state and per-reason drop counts).
"""
