"""Build grounded image-text (GRIT) corpora: spaCy noun chunks grounded by an open-vocabulary detector.

See ``GRIT_SPEC`` in the docs for the record format and every rule the pipeline applies.
"""

__version__ = "0.1.0"
