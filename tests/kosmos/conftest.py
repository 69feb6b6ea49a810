"""Fixtures of the kosmos tests."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from kosmos_shards import CAPTIONS_WITH_TAGS, CORPUS


@pytest.fixture(scope="session")
def tokenizer():
    from kosmos.data.tokenizer import KosmosTokenizer

    return KosmosTokenizer.train(CORPUS, vocab_size=600, min_frequency=2)


# The image settings of microsoft/kosmos-2-patch14-224's preprocessor_config.json: the whole image resized to
# 224 x 224 (use_square_size), so the centre crop that follows cuts nothing.
RELEASED_PREPROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "use_square_size": True,
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """A sentencepiece BPE trained here, as transformers saves it: a Kosmos-2 processor folder, a plain XLM-R
    tokenizer folder and a folder holding only the sentencepiece model."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import CLIPImageProcessorPil, XLMRobertaTokenizer
    from transformers.models.kosmos2.processing_kosmos2 import Kosmos2Processor

    root = tmp_path_factory.mktemp("hf_tok")
    rng = random.Random(0)
    sentences = [" ".join(rng.sample(CAPTIONS_WITH_TAGS[0].split() + CORPUS[0].split(), 6)) for _ in range(200)]
    spm_dir = root / "spm_only"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences + CORPUS),
        model_prefix=str(root / "sp"),
        vocab_size=150,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    # transformers' own file name for XLM-R / Kosmos-2 sentencepiece models.
    shutil.copy(root / "sp.model", spm_dir / "sentencepiece.bpe.model")
    xlmr = XLMRobertaTokenizer.from_pretrained(str(spm_dir))
    xlmr.save_pretrained(str(root / "xlmr_plain"))
    image_processor = CLIPImageProcessorPil(**RELEASED_PREPROCESSOR)
    processor = Kosmos2Processor(image_processor, XLMRobertaTokenizer.from_pretrained(str(spm_dir)))
    processor.save_pretrained(str(root / "kosmos2"))
    return {"spm_only": spm_dir, "plain": root / "xlmr_plain", "kosmos2": root / "kosmos2", "spm_pieces": 150}


# ---------------------------------------------------------------------------------------------------------------
# Training tests: one synthetic shapes corpus (tests/kosmos/shapes_corpus.py) and its tokenizer for the session.
# ---------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCENES = 3000
HELDOUT_SCENES = 200
WIRING_SCENES = 64


@pytest.fixture(scope="session")
def shapes(tmp_path_factory, spacy_model_name):
    """A GRIT corpus of shape scenes made by ``grit build`` with the ``annotations`` source (boxes that come with the
    input): ``train`` (3,000 scenes, one or two shapes), ``heldout`` (200 others) and ``wiring`` (64 one-shape
    scenes), one input file each, so each set has its own shards; and a tokenizer trained on the training captions
    with ``kosmos tokenizer train``."""
    import os
    import subprocess
    import sys

    from shapes_corpus import scenes, write_build_input

    from kosmos.cli import main

    root = Path(tmp_path_factory.mktemp("shapes"))
    sets = {
        "train": scenes(TRAIN_SCENES, seed=1),
        "heldout": scenes(HELDOUT_SCENES, seed=2),
        # One shape, named alone ("a red circle"): twelve captions for 64 scenes, so a caption never singles out a
        # scene and fitting the set takes the image (the templates' suffixes would, through the expressions).
        "wiring": scenes(WIRING_SCENES, seed=3, max_shapes=1, templates=("{}",)),
    }
    corpus = root / "corpus"
    out = {"root": root, "corpus": str(corpus)}
    inputs = [str(write_build_input(root / "input", items, name)) for name, items in sets.items()]
    command = [sys.executable, "-m", "grit_pipeline", "build", "--config", str(REPO / "configs/default.yaml")]
    command += [arg for path in inputs for arg in ("--input", path)] + ["--output", str(corpus)]
    overrides = ["detector.kind=annotations", f"text.spacy_model={spacy_model_name}"]
    for item in [*overrides, "output.samples_per_shard=1000", "output.progress_interval_s=0"]:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, stopped when it ends
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Shards are named <input file>-<block>: 3 of train (1,000 samples each), then heldout, then wiring.
    out.update(train=str(corpus / "00000-{00000..00002}.tar"), heldout=str(corpus / "00001-00000.tar"))
    out["wiring"] = str(corpus / "00002-00000.tar")
    code = main(["tokenizer", "train", "--shards", out["train"], "--vocab-size", "300", "--out", str(root / "tok")])
    assert code == 0
    out["tokenizer"] = str(root / "tok")
    return out


@pytest.fixture(scope="session")
def wiring_run(shapes, tmp_path_factory):
    """The tiny model trained on the 64 one-shape wiring scenes until it fits them (600 steps of 16)."""
    from train_runs import train_args

    from kosmos.cli import main

    out = tmp_path_factory.mktemp("wiring") / "run"
    sets = ["run.max_steps=600", "data.batch_size=16", "optim.lr=3.0e-3", "data.shuffle_buffer=64"]
    sets += ["data.shuffle_initial=64", "run.log_every=100", "run.checkpoint_every=600"]
    assert main(train_args(shapes["tokenizer"], shapes["wiring"], out, *sets)) == 0
    return out
