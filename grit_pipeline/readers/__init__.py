"""Input readers: img2dataset WebDataset tars, parquet and JSONL tables, and folders of images with captions.

One module per input format (``webdataset.py``, ``table.py``, ``folder.py``), the sample type and the metadata
parsing they share in ``sample.py``, the policy for image paths and URLs named by tables in ``references.py``, and
file discovery in ``discover.py``. Each reader turns one input file into :class:`InputSample` objects in a fixed
order (tar member order, table row order, sorted paths), which is what makes shard assignment deterministic (see
``docs/pipeline.md``). Readers never extract anything to disk and never raise on a bad sample: a sample they cannot
read becomes a dropped ``InputSample`` with its reason (GRIT_SPEC 3.0). Input files are opened through fsspec, so
anything fsspec or pyarrow can open (``s3://``, ``gs://``, ``hf://``, ``http(s)://``) works as an input where the
matching back end is installed; what a table's image column may point to is a separate, narrower policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from grit_pipeline.config import InputConfig
from grit_pipeline.readers.discover import resolve_inputs
from grit_pipeline.readers.folder import iter_image_folder
from grit_pipeline.readers.sample import (
    FORMATS,
    InputError,
    InputFile,
    InputSample,
    Skip,
    clean_sample,
    failed_sample,
    generated_key,
    make_key,
    split_member_name,
)
from grit_pipeline.readers.table import iter_jsonl, iter_parquet
from grit_pipeline.readers.webdataset import iter_webdataset

__all__ = [
    "FORMATS",
    "InputError",
    "InputFile",
    "InputSample",
    "Skip",
    "generated_key",
    "iter_samples",
    "make_key",
    "resolve_inputs",
    "split_member_name",
]

READERS: dict[str, Callable[..., Iterator[InputSample]]] = {
    "webdataset": iter_webdataset,
    "parquet": iter_parquet,
    "jsonl": iter_jsonl,
    "images": iter_image_folder,
}


def iter_samples(
    inp: InputFile, cfg: InputConfig, max_image_bytes: int, skip: int | Skip = 0
) -> Iterator[InputSample]:
    """Samples of one input file in their fixed order, every text field valid UTF-8.

    The positions in ``skip`` (a :class:`Skip`, or an int for the first that many) come back as
    ``drop_reason="skipped"`` placeholders (counted, data unread) so positions stay aligned with shard blocks. Only
    a file that cannot be opened, or breaks so that the number of samples left is unknown, raises; the caller
    records that as one ``bad_input`` row.
    """
    if inp.format not in READERS:
        raise InputError(f"unknown input format {inp.format!r}")
    for sample in READERS[inp.format](inp.path, cfg, max_image_bytes, skip=skip):
        try:
            yield clean_sample(sample)
        except Exception as exc:  # noqa: BLE001 - a sample that cannot be cleaned is dropped, not the file
            yield clean_sample(failed_sample("bad_sample", inp.path, exc, "text"))
