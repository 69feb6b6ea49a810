"""A compact, readable Kosmos-2: CLIP-style vision encoder, latent-query connector, Magneto decoder, 1,024
location tokens; with its tokenizer, a WebDataset loader for GRIT shards, a trainer, generation, evaluation and
conversion to and from Hugging Face checkpoints.

Packages, in data-flow order: :mod:`kosmos.model` (architecture, weights I/O, initialisation, parallelism),
:mod:`kosmos.data` (shards to batches), :mod:`kosmos.train` (the training run), :mod:`kosmos.eval` (evaluation,
generation) and :mod:`kosmos.cli` (the ``kosmos`` command). docs/architecture.md says what may import what.
"""

__version__ = "0.1.0"
