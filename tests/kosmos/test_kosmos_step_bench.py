"""The model benchmark's pieces: its import chain stays GPU-machine clean, and its FLOP count is the textbook one."""

from __future__ import annotations

import subprocess
import sys

import torch

from benchmarks.kosmos_step import make_batch, train_flops
from kosmos.model.registry import create_model, model_config


def test_gpu_path_imports_no_pipeline_packages():
    # The GPU machine has torch, transformers, numpy and pillow only: no ray, spaCy or webdataset on this path.
    code = (
        "import sys, benchmarks.kosmos_step, kosmos.model, kosmos.model.hf, kosmos.model.parallelize, "
        "kosmos.model.init, kosmos.model.generation\n"
        "print(sorted(m for m in ('ray', 'spacy', 'webdataset', 'pyarrow', 'grit_pipeline') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_flops_counts_every_weight_with_the_tokens_it_sees():
    cfg = model_config("kosmos2-1.6b")
    with torch.device("meta"):
        model = create_model("kosmos2-1.6b")
    b, seq, q, n_img = 8, 512, cfg.latent_query_num, cfg.num_image_tokens
    tokens = {"vision.": b * n_img, "connector.dense": b * n_img, "connector.kv_proj": b * (n_img + q)}
    tokens |= {"connector.q_proj": b * q, "connector.out_proj": b * q, "blocks.": b * seq}
    params_x_tokens = b * seq * model.embed_tokens.weight.numel()  # the tied LM head
    params_x_tokens += b * (n_img - 1) * model.vision.patch_embed.weight.numel()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            params_x_tokens += module.weight.numel() * next(n for k, n in tokens.items() if name.startswith(k))
    t, v = cfg.text, cfg.vision
    attention = 12 * b * (v.layers * v.width * n_img**2 + t.dim * (n_img + q) * q + t.layers * t.dim * seq**2)
    assert train_flops(cfg, b, seq) == 6 * params_x_tokens + attention


def test_benchmark_batch_has_the_kosmos_layout():
    cfg = model_config("tiny")
    batch = make_batch(cfg, 2, 40, "cpu")
    assert batch["image_embeds_position_mask"].sum(1).tolist() == [16, 16]
    assert (batch["labels"][:, : 2 + 16 + 1] == -100).all() and (batch["labels"][:, 19:] >= 3).all()
    out = create_model("tiny")(**batch, return_logits=False)
    assert torch.isfinite(out.loss)


def test_mfu_counts_the_lm_head_only_where_it_runs():
    from benchmarks.kosmos_step import ours_inputs, target_positions

    cfg = model_config("tiny")
    batch = make_batch(cfg, 2, 40, "cpu")
    lm = target_positions(cfg, 40)
    assert ours_inputs(batch, "cpu")["target_index"].numel() == 2 * lm  # the rows the LM head computes
    saved = train_flops(cfg, 2, 40) - train_flops(cfg, 2, 40, lm_positions=lm)
    assert saved == 6 * 2 * (40 - lm) * cfg.text.vocab_size * cfg.text.dim


def test_headline_has_the_top_level_keys():
    from benchmarks.kosmos_step import headline

    head = headline("NVIDIA H200", {"tokens_per_s": 5.0, "mfu": 0.41}, 1.5)
    assert set(head) == {"device", "tokens_per_s", "mfu", "speedup_vs_hf", "date"}
    assert head["mfu"] == 0.41 and head["speedup_vs_hf"] == 1.5
