"""How fast the trainer eats samples, beside how fast one loader worker makes them (``trainer_consumption`` in the
loader benchmark's JSON): workers needed per training process = consumption / per-worker rate.

- Tiny size, measured here: the training step of ``configs/train/tiny-cpu.yaml`` (``Trainer.train_step``: forward,
  backward, clip, AdamW; frozen vision tower, fp32, one thread) on batches of 32 synthetic shape scenes (64 px),
  and the loader (one reader) on the same shards.
- 1.6B, derived (not measured here): tokens/s of our compiled training step on an H200 from
  ``benchmarks/results/kosmos_step_cuda.json`` (bf16, batch 8 x 512), divided by the tokens per sample: 512 at that
  benchmark's shape (one sample per row), and the mean sample length the loader benchmark measured for packed
  rows. That assumes tokens/s does not change with the row length (at 2,048 attention costs somewhat more).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR

TINY_BATCH = 32
TINY_STEPS = 30


def measure_tiny() -> dict:
    import torch

    from kosmos.cli import main as kosmos_main
    from kosmos.data.loader import make_loader
    from kosmos.data.tokenizer import KosmosTokenizer
    from kosmos.train.config import load_train_config
    from kosmos.train.log import MetricsLogger
    from kosmos.train.loop import Trainer
    from kosmos.train.setup import Dist, build_model, make_optimizer
    from tests.kosmos.shapes_corpus import scenes, write_shards

    repo = Path(__file__).resolve().parent.parent
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "shards", scenes(1000, seed=0), per_shard=500)
        shards = str(Path(tmp) / "shards" / "*.tar")
        quiet = kosmos_main(["tokenizer", "train", "--shards", shards, "--vocab-size", "300", "--out", f"{tmp}/tok"])
        assert quiet == 0
        cfg = load_train_config(
            repo / "configs/train/tiny-cpu.yaml",
            [f"tokenizer={tmp}/tok", f"data.sources=[{{kind: grit, shards: ['{shards}']}}]", "data.num_workers=0"],
        )
        tokenizer = KosmosTokenizer.from_pretrained(cfg.tokenizer)
        torch.manual_seed(0)
        torch.set_num_threads(cfg.run.threads)
        try:
            model = build_model(cfg, tokenizer, torch.device("cpu"))
            cfg.data.sequence.image_size = model.config.vision.image_size
            cfg.data.sequence.num_image_tokens = model.config.latent_query_num
            loader = iter(make_loader(cfg.data, tokenizer))
            next(loader)  # the first shuffle buffer fills, timed apart
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(TINY_STEPS + 5)]
            loader_s = time.perf_counter() - t0
            logger = MetricsLogger(tmp, enabled=False, tensorboard=False)
            trainer = Trainer(cfg, model, model, make_optimizer(model, cfg.optim), tokenizer, Dist(), logger)
            times = []
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                trainer.train_step([batch])
                if i >= 5:
                    times.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
    step = statistics.median(times)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / sum(len(b["keys"]) for b in batches)
    loader_rate = sum(len(b["keys"]) for b in batches) / loader_s
    return {
        "measured": True,
        "what": "Trainer.train_step of configs/train/tiny-cpu.yaml (frozen vision, fp32, 1 thread), CPU",
        "batch": TINY_BATCH,
        "image_size": model.config.vision.image_size,
        "tokens_per_sample": round(tokens, 1),
        "step_s_median": round(step, 5),
        "samples_per_s": round(TINY_BATCH / step, 1),
        "loader_samples_per_s_per_worker_same_data": round(loader_rate, 1),
        "workers_needed": round(TINY_BATCH / step / loader_rate, 2),
    }


def derive_1p6b(loader_per_worker: float, tokens_per_sample_packed: float | None) -> dict:
    path = RESULTS_DIR / "kosmos_step_cuda.json"
    if not path.is_file():
        return {"measured": False, "skipped": f"{path.name} not found"}
    step = json.loads(path.read_text())
    tokens_per_s = step["ours_compiled"]["tokens_per_s"]
    seq = step["setting"]["seq"]
    out = {
        "measured": False,
        "derived_from": f"benchmarks/results/{path.name}: ours_compiled tokens/s, {step['setting']['precision']}, "
        f"batch {step['setting']['batch']} x {seq}",
        "gpu": step["machine"].get("gpu"),
        "tokens_per_s_per_gpu": tokens_per_s,
        "samples_per_s_per_gpu_one_sample_per_row": round(tokens_per_s / seq, 1),
        "loader_samples_per_s_per_worker": loader_per_worker,
        "workers_per_gpu_one_sample_per_row": round(tokens_per_s / seq / loader_per_worker, 2),
    }
    if tokens_per_sample_packed:
        per_gpu = tokens_per_s / tokens_per_sample_packed
        out["tokens_per_sample_packed"] = tokens_per_sample_packed
        out["samples_per_s_per_gpu_packed"] = round(per_gpu, 1)
        out["workers_per_gpu_packed"] = round(per_gpu / loader_per_worker, 2)
    return out
