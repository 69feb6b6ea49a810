"""A compact, readable Kosmos-2: CLIP-style vision encoder, latent-query connector, Magneto decoder, 1,024
location tokens; with its tokenizer, a WebDataset loader for GRIT shards, a trainer, generation, evaluation and
conversion to and from Hugging Face checkpoints.
"""

__version__ = "0.1.0"
