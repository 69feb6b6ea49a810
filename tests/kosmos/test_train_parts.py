"""The trainer's pure parts: schedule, parameter groups, checkpoint files and pointer, metrics, config checks,
weight-change summary, grounding-eval geometry, and the model's slot-order image layout."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from grit_core.config import ConfigError
from kosmos.eval.generate import crop_box_to_pixels
from kosmos.eval.grounding import baseline_boxes, best_iou, box_iou
from kosmos.eval.weight_diff import check_expectations, diff_state_dicts, module_of
from kosmos.model.parallelize import freeze_vision
from kosmos.model.registry import create_model
from kosmos.train.config import OptimConfig, load_train_config
from kosmos.train.log import format_progress, truncate_metrics
from kosmos.train.setup import lr_factor, param_groups
from kosmos.train.state import (
    STATE_FILE,
    CheckpointError,
    capture_rng_state,
    finalize_checkpoint,
    latest_checkpoint,
    optimizer_state_from_files,
    optimizer_state_to_files,
    remove_incomplete,
    resolve_model_dir,
    restore_rng_state,
    temporary_dir,
)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, cfg, 12) for s in (1, 2, 4, 8, 12)] == [0.25, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(100, OptimConfig(warmup_steps=4, decay="constant"), 12) == 1.0
    assert lr_factor(1, OptimConfig(warmup_steps=0), 10) == pytest.approx(0.9)


def test_param_groups_decay_matrices_only_and_scale_the_vision_tower():
    model = create_model("tiny")
    groups = param_groups(model, OptimConfig(weight_decay=0.01, vision_lr_scale=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        ns = [names[id(p)] for p in group["params"]]
        vision = {n.startswith("vision.") for n in ns}
        assert len(vision) == 1 and group["lr_scale"] == (0.1 if vision.pop() else 1.0)
        for n, p in zip(ns, group["params"]):
            assert (group["weight_decay"] > 0) == (p.ndim >= 2 and not n.endswith("class_embedding")), n
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    freeze_vision(model)
    assert all(not names[id(p)].startswith("vision.") for g in param_groups(model, OptimConfig()) for p in g["params"])


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.randn(2, 3)).pow(2).sum().backward()
    opt.step()
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    tensors, meta = optimizer_state_to_files(state)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(meta))
    back = optimizer_state_from_files(
        load_file(str(tmp_path / "o.safetensors")), json.loads((tmp_path / "o.json").read_text())
    )
    assert back["param_groups"][0]["betas"] == (0.9, 0.98)
    assert set(back["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for name, fields in state["state"].items():
        assert all(torch.equal(fields[k], back["state"][name][k]) for k in fields)


def test_rng_states_round_trip():
    tensors, meta = capture_rng_state()
    json.dumps(meta)  # JSON as it is stored
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(tensors, meta)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def _fake_checkpoint(out, step, complete=True):
    tmp = temporary_dir(out, step)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    if complete:
        (tmp / STATE_FILE).write_text(json.dumps({"format": "kosmos-train-state", "step": step}))
    return tmp


def test_checkpoint_folder_is_renamed_then_pointed_to_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
        finalize_checkpoint(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path) == root / "step_00000003"
    assert resolve_model_dir(tmp_path) == resolve_model_dir(root) == root / "step_00000003"
    assert resolve_model_dir(root / "latest") == root / "step_00000003"
    # An incomplete write is refused and the pointer stays where it was; the leftovers go at the next start.
    _fake_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(CheckpointError, match="incomplete"):
        finalize_checkpoint(tmp_path, 4, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert remove_incomplete(tmp_path) == [".tmp-step_00000004"]
    with pytest.raises(CheckpointError, match="no model"):
        resolve_model_dir(tmp_path / "nothing")


def test_metrics_after_the_resumed_step_are_dropped_and_progress_reads_well(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"kind": "tr')
    assert truncate_metrics(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    record = {"step": 120, "loss": 2.34567, "lr": 1.6e-4, "grad_norm": 0.82, "samples_per_s": 410.2}
    line = format_progress({**record, "tokens_per_s": 15234.0, "eta_s": 70}, 600)
    assert (
        line == "step 120/600 (20%) | loss 2.3457 | lr 1.60e-04 | gnorm 0.82 | 410 samples/s | 15.2k tok/s | eta 1m10s"
    )


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer is empty"):
        load_train_config(None, ["data.sources=[{kind: grit, shards: [x.tar]}]"])
    with pytest.raises(ConfigError, match="data.sources is empty"):
        load_train_config(None, ["tokenizer=tok"])
    with pytest.raises(ConfigError, match="run.precision"):
        load_train_config(None, ["tokenizer=tok", "data.sources=[{shards: [x.tar]}]", "run.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_train_config(None, ["optim.learning_rate=1"])
    cfg = load_train_config(None, ["tokenizer=tok", "data.sources=[{shards: [x.tar]}]"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (2e-4, [0.9, 0.98], 1e-6, 0.01)
    assert (cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.run.max_steps) == (375, 2.0, 60000)


def test_weight_change_summary_and_expectations():
    before = {
        "vision.blocks.0.fc.weight": torch.ones(2, 2),
        "blocks.0.fc.weight": torch.ones(3),
        "ln.bias": torch.ones(1),
    }
    after = dict(before, **{"blocks.0.fc.weight": torch.tensor([1.0, 2.0, 1.0])})
    rows = {r["module"]: r for r in diff_state_dicts(before, after)}
    assert rows["blocks.0"]["changed"] == 1 and rows["blocks.0"]["rel_change"] == pytest.approx(1 / 3**0.5)
    assert rows["vision.blocks"]["changed"] == 0 and set(rows) == {"vision.blocks", "blocks.0", "ln"}
    assert check_expectations(list(rows.values()), frozen=["vision"], trained=["blocks"]) == []
    problems = check_expectations(list(rows.values()), frozen=["blocks"], trained=["vision", "ln"])
    assert problems == [
        "expected frozen, but changed: blocks.0",
        "expected trained, but unchanged: vision",
        "expected trained, but unchanged: ln",
    ]
    assert module_of("connector.latent_query", 2) == "connector.latent_query"
    assert module_of("embed_tokens.weight", 2) == "embed_tokens"


def test_grounding_geometry():
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert best_iou((0, 0, 1, 1), [(0, 0, 0.5, 0.5), (0, 0, 1, 0.9)]) == pytest.approx(0.9)
    base = baseline_boxes([[(0.0, 0.0, 0.2, 0.4)], [(0.6, 0.4, 1.0, 0.8)]])
    assert base["mean_box"] == pytest.approx((0.3, 0.2, 0.6, 0.6))
    assert base["centred_box"] == pytest.approx((0.35, 0.3, 0.65, 0.7))
    # A 448 x 224 image: resized to 448 x 224 (already short side 224), crop offset 112 on x.
    assert crop_box_to_pixels((0.0, 0.0, 1.0, 0.5), 448, 224, 224) == [112.0, 0.0, 336.0, 112.0]


def test_images_in_slot_order_match_the_per_row_layout():
    """The loader's layout (images in slot order; text-only and packed rows) gives what the per-row layout gives."""
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    q = model.config.latent_query_num
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    ids = torch.randint(3, 900, (3, 2 * q + 12), generator=g)
    slots = torch.zeros_like(ids)
    slots[0, 2 : 2 + q] = 1  # one image
    slots[2, 2 : 2 + q] = 1  # row 1: text only; row 2: two images (packed)
    slots[2, q + 6 : 2 * q + 6] = 1
    out = model(pixels, ids, slots, images_in_slot_order=True).logits
    single = model(pixels[:1], ids[:1], slots[:1]).logits
    torch.testing.assert_close(out[:1], single)
    text_only = model(input_ids=ids[1:2]).logits
    torch.testing.assert_close(out[1:2], text_only)
    with pytest.raises(ValueError, match="image slots in blocks"):
        model(pixels[:2], ids, slots, images_in_slot_order=True)


def test_build_model_sizes_to_the_tokenizer_and_freezes_as_asked(tokenizer):
    from kosmos.train.setup import build_model

    def model_with(*sets):
        cfg = load_train_config(None, ["tokenizer=tok", "data.sources=[{shards: [x.tar]}]", "model.size=tiny", *sets])
        return build_model(cfg, tokenizer, torch.device("cpu"))

    model = model_with("model.vision_trainable_blocks=1")
    assert model.config.text.vocab_size == tokenizer.vocab_size
    assert model.config.loc_token_start == tokenizer.loc_token_start
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "ln_post.")) for n in trainable)
    assert all(p.requires_grad for p in model.blocks.parameters())
    frozen = model_with("model.freeze_vision=true")
    assert not any(p.requires_grad for p in frozen.vision.parameters())
    assert frozen.config == model.config  # freezing is a run setting: the model's config stays the architecture
    with pytest.raises(ConfigError, match="contradict"):
        model_with("model.freeze_vision=true", "model.vision_trainable_blocks=0")
    with pytest.raises(ConfigError, match="has 2 blocks"):
        model_with("model.vision_trainable_blocks=3")


def test_checkpoint_loading_never_unpickles():
    """Every torch.load in the packages passes weights_only=True; training state is safetensors and JSON only."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    calls = 0
    for path in [*(root / "kosmos").rglob("*.py"), *(root / "grit_pipeline").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kwargs.get("weights_only") == "True", f"{path.name}:{node.lineno}"
            if isinstance(node, (ast.Import, ast.ImportFrom)) and path.name != "checkpoint_dcp.py":
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path.name}:{node.lineno}"
    assert calls >= 1  # convert.py reads pytorch_model.bin this way
    # DCP's .metadata is a pickle: the one module that reads it does so through an Unpickler subclass whose
    # find_class allows only listed globals, and never calls pickle.load/loads.
    dcp = ast.parse((root / "kosmos" / "model" / "checkpoint_dcp.py").read_text())
    unpicklers = [
        c
        for c in ast.walk(dcp)
        if isinstance(c, ast.ClassDef) and any(ast.unparse(b) == "pickle.Unpickler" for b in c.bases)
    ]
    assert unpicklers and all(any(getattr(f, "name", "") == "find_class" for f in c.body) for c in unpicklers)
    called = {ast.unparse(n.func) for n in ast.walk(dcp) if isinstance(n, ast.Call)}
    assert not called & {"pickle.load", "pickle.loads", "pickle.Unpickler"}


def test_the_gpu_check_script_runs_without_the_shard_readers():
    """benchmarks/trainer_gpu.py, as the GPU machine runs it (no webdataset, no braceexpand), on the tiny size."""
    import subprocess
    import sys

    code = (
        "import sys, json; sys.modules['webdataset'] = None; sys.modules['braceexpand'] = None\n"
        "from benchmarks.trainer_gpu import run; print(json.dumps(run('cpu')))"
    )
    env = {**os.environ, "TRAINER_GPU_SMOKE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stubbed_modules"] == ["webdataset", "braceexpand"] and result["all_checks_pass"], result


def _trainer_for(tokenizer, tmp_path, *sets):
    from kosmos.train.log import MetricsLogger
    from kosmos.train.loop import Trainer
    from kosmos.train.setup import Dist, build_model, make_optimizer

    base = [
        "tokenizer=tok",
        "data.sources=[{shards: [x.tar]}]",
        "model.overrides={text: {dropout: 0.0, attention_dropout: 0.0}}",
    ]
    cfg = load_train_config(None, [*base, "optim.warmup_steps=0", "run.max_steps=10", *sets])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    logger = MetricsLogger(tmp_path, enabled=False, tensorboard=False)
    return model, Trainer(cfg, model, model, make_optimizer(model, cfg.optim), tokenizer, Dist(), logger)


def test_gradient_accumulation_is_the_big_batch_update(tokenizer, tmp_path):
    """Two micro-batches of 4 rows (of different lengths) make the same update as one batch of 8."""
    from benchmarks.trainer_gpu import synthetic_batches

    a, b = synthetic_batches(tokenizer, 2, 4, 10, 64, 16, seed=3)
    b["labels"][:, -3:] = -100  # uneven target counts: the mean must be over tokens, not micro-batches
    big = {k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else a[k] + b[k] for k in a}
    model1, one = _trainer_for(tokenizer, tmp_path)
    model2, accumulated = _trainer_for(tokenizer, tmp_path, "run.grad_accum=2")
    s1, s2 = one.train_step([big]), accumulated.train_step([a, b])
    assert s1.targets == s2.targets and s1.loss_sum == pytest.approx(s2.loss_sum, rel=1e-6)
    assert s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-5)
    for (name, p1), p2 in zip(model1.named_parameters(), model2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7, msg=name)


def test_clip_vision_weights_load_into_a_scratch_model(tokenizer, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from kosmos.train.setup import build_model

    clip_cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    clip_cfg.image_size, clip_cfg.patch_size = 64, 8
    torch.manual_seed(1)
    CLIPVisionModel(clip_cfg).save_pretrained(tmp_path / "clip")
    sets = ["tokenizer=tok", "data.sources=[{shards: [x.tar]}]", f"model.clip_vision={tmp_path / 'clip'}"]
    model = build_model(load_train_config(None, sets), tokenizer, torch.device("cpu"))
    clip = CLIPVisionModel.from_pretrained(tmp_path / "clip")
    ours = model.vision.patch_embed.weight
    torch.testing.assert_close(ours, clip.embeddings.patch_embedding.weight)
    with pytest.raises(ConfigError, match="block_pool is for a random vision tower"):
        build_model(
            load_train_config(None, [*sets, "model.connector_init=block_pool"]), tokenizer, torch.device("cpu")
        )


def test_old_run_flags_in_model_overrides_still_load():
    """Configs written when the model config held run flags set them in model.overrides: they move to their fields."""
    base = ["tokenizer=tok", "data.sources=[{shards: [x.tar]}]"]
    old = "model.overrides={gradient_checkpointing: true, freeze_vision: true, connector_init: block_pool}"
    cfg = load_train_config(None, [*base, old])
    assert cfg.parallel.activation_checkpointing and cfg.model.freeze_vision
    assert cfg.model.connector_init == "block_pool" and cfg.model.loc_embed_init == "random"
    assert cfg.model.overrides == {}
    kept = load_train_config(None, [*base, "model.overrides={text: {dropout: 0.0}, loc_embed_init: sincos}"])
    assert kept.model.overrides == {"text": {"dropout": 0.0}} and kept.model.loc_embed_init == "sincos"
    with pytest.raises(ConfigError, match="contradicts model.connector_init"):
        load_train_config(None, [*base, "model.connector_init=block_pool", "model.overrides={connector_init: random}"])
    with pytest.raises(ConfigError, match="freeze_vision: 'yes'"):
        load_train_config(None, [*base, "model.overrides={freeze_vision: 'yes'}"])
    with pytest.raises(ConfigError, match="precision' must be one of fp32, bf16"):
        load_train_config(None, [*base, "run.precision=fp8"])


def test_the_run_derives_sequence_geometry_into_a_new_config_and_leaves_the_callers():
    from kosmos.train.run import resolved_config

    cfg = load_train_config(None, ["tokenizer=tok", "data.sources=[{kind: grit, shards: [x.tar]}]"])
    before = json.dumps(cfg.data.sequence.__dict__, sort_keys=True)
    model = create_model("tiny")
    run_cfg = resolved_config(cfg, model)
    seq = run_cfg.data.sequence
    assert (seq.image_size, seq.num_image_tokens, seq.num_bins) == (
        model.config.vision.image_size, model.config.latent_query_num, model.config.loc_bins,
    )  # fmt: skip
    assert seq.image_frame == "center_crop"  # what "auto" means for a model trained from scratch
    assert json.dumps(cfg.data.sequence.__dict__, sort_keys=True) == before  # the caller's config is untouched
    assert cfg.data.sequence.image_frame == "auto" and seq.image_size != cfg.data.sequence.image_size
