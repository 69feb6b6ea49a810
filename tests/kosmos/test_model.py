"""kosmos.model on the tiny size: loss, image slots, KV cache, checkpointing, freezing, multiway, initialisations."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from kosmos.model.checkpoint import CONFIG_NAME, load_model, save_model
from kosmos.model.config import KosmosConfig
from kosmos.model.init import apply_init, patch_blocks
from kosmos.model.model import DecoderBlock, KosmosModel, insert_image_embeds, make_positions
from kosmos.model.parallelize import freeze_vision, set_activation_checkpointing
from kosmos.model.registry import create_model, list_models, model_config

Q = 16  # tiny's latent queries


def batch(b: int = 2, t: int = 28, seed: int = 0, image_size: int = 64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (b, t), generator=g)
    ids[:, 0] = 0
    image_mask = torch.zeros(b, t, dtype=torch.bool)
    image_mask[:, 2 : 2 + Q] = True
    pixels = torch.randn(b, 3, image_size, image_size, generator=g)
    return pixels, ids, image_mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def test_registry_sizes_and_overrides():
    assert list_models() == ["tiny", "kosmos2-base", "kosmos2-1.6b"]
    paper = model_config("kosmos2-1.6b")
    assert (paper.text.dim, paper.text.layers, paper.vision.width, paper.latent_query_num) == (2048, 24, 1024, 64)
    assert paper.num_image_tokens == 257 and paper.loc_token_start == 64013
    cfg = model_config("tiny", text={"vocab_size": 3000}, loc_token_start=1976, multiway_ffn=True)
    assert (cfg.text.vocab_size, cfg.text.dim, cfg.loc_token_start, cfg.multiway_ffn) == (3000, 64, 1976, True)
    with pytest.raises(ValueError, match="unknown KosmosConfig field 'freeze_vision'"):
        model_config("tiny", freeze_vision=True)  # a run setting, not the architecture
    with pytest.raises(ValueError, match="unknown model"):
        model_config("huge")
    with pytest.raises(ValueError, match="unknown KosmosConfig field"):
        model_config("tiny", colour="blue")
    with pytest.raises(ValueError, match="divisible"):
        model_config("tiny", text={"heads": 5})
    with torch.device("meta"):
        assert 1.6e9 < create_model("kosmos2-1.6b").num_parameters() < 1.7e9
        assert 2e8 < create_model("kosmos2-base").num_parameters() < 5e8


def test_loss_is_shifted_cross_entropy_and_loss_mask_matches_labels(model):
    pixels, ids, image_mask = batch()
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 2 + Q + 1, -100)
    out = model(pixels, ids, image_mask, labels=labels)
    assert out.logits.shape == (2, 28, 2048)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 2048), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(model(pixels, ids, image_mask, loss_mask=labels.ne(-100)).loss, out.loss)
    summed = model(pixels, ids, image_mask, labels=labels, reduction="sum").loss
    torch.testing.assert_close(summed, out.loss * labels[:, 1:].ne(-100).sum())
    assert model(pixels, ids, image_mask).loss is None


def test_image_embeddings_fill_the_slots_and_text_only_rows_work(model):
    pixels, ids, image_mask = batch()
    x = torch.zeros(2, 28, 64)
    emb = torch.randn(2, Q, 64)
    filled = insert_image_embeds(x, emb, image_mask)
    assert torch.equal(filled[:, 2 : 2 + Q], emb) and not filled[:, :2].any() and not filled[:, 2 + Q :].any()
    # A mixed batch: row 1 has no image; its logits equal those of the same row run alone as text.
    image_mask[1] = False
    with torch.no_grad():
        mixed = model(pixels, ids, image_mask).logits
        alone = model(input_ids=ids[1:]).logits
        image_row = model(pixels[:1], ids[:1], image_mask[:1]).logits
    torch.testing.assert_close(mixed[1:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[:1], image_row, atol=1e-5, rtol=0)
    assert not torch.allclose(image_row, model(input_ids=ids[:1]).logits, atol=1e-3)  # the image matters
    image_mask[0, 2] = False
    with pytest.raises(ValueError, match="image slots"):
        model(pixels, ids, image_mask)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids, image_embeds_position_mask=batch()[2])


def test_positions_follow_fairseq_with_padding():
    ids = torch.tensor([[1, 1, 0, 5, 6], [0, 5, 6, 7, 1]])
    assert make_positions(ids, 1).tolist() == [[1, 1, 2, 3, 4], [2, 3, 4, 5, 1]]
    assert make_positions(torch.tensor([[9]]), 1, past_length=5).tolist() == [[7]]


def left_padded(ids, image_mask, pads):
    ids, image_mask, attention = ids.clone(), image_mask.clone(), torch.ones_like(ids)
    for b, n in enumerate(pads):
        if n:
            ids[b] = torch.cat([torch.ones(n, dtype=ids.dtype), ids[b, :-n]])
            image_mask[b] = torch.cat([torch.zeros(n, dtype=torch.bool), image_mask[b, :-n]])
            attention[b, :n] = 0
    return ids, image_mask, attention


def test_kv_cache_steps_give_the_full_forward_logits(model):
    from kosmos.model.generation import KVCache

    pixels, ids, image_mask = batch(b=3, seed=1)
    ids, image_mask, attention = left_padded(ids, image_mask, [0, 3, 1])
    prompt = 2 + Q + 3
    with torch.no_grad():
        full = model(pixels, ids, image_mask, attention).logits
        cache = KVCache(len(model.blocks), ids.shape[1])
        steps = [model(pixels, ids[:, :prompt], image_mask[:, :prompt], attention[:, :prompt], cache=cache).logits]
        steps.append(model(input_ids=ids[:, prompt : prompt + 4], attention_mask=attention[:, : prompt + 4],
                           cache=cache).logits)  # fmt: skip
        for t in range(prompt + 4, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], attention_mask=attention[:, : t + 1], cache=cache).logits)
    # Positions restart for the new tokens as HF does, so compare only the rows without left padding ...
    torch.testing.assert_close(torch.cat(steps, dim=1)[0], full[0], atol=1e-5, rtol=0)
    # ... and, for every row, the real (non-pad) tokens of the prompt, which is computed in one piece either way.
    real = attention[:, :prompt].bool()
    torch.testing.assert_close(steps[0][real], full[:, :prompt][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("no_repeat", [0, 3])
def test_generate_with_cache_equals_without(model, no_repeat):
    # Unpadded prompts: with left padding, cached decoding numbers new positions after the pads, as HF does
    # (test_convert checks that against HF), while a full recompute numbers them after the real tokens.
    pixels, ids, image_mask = batch(b=3, t=2 + Q + 3, seed=2)
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask)
    cached = model.generate(**kwargs, max_new_tokens=12, no_repeat_ngram_size=no_repeat)
    uncached = model.generate(**kwargs, max_new_tokens=12, no_repeat_ngram_size=no_repeat, use_cache=False)
    assert cached.shape == (3, ids.shape[1] + 12)
    assert torch.equal(cached[:, : ids.shape[1]], ids)
    assert torch.equal(cached, uncached)


def test_generation_stops_when_every_row_has_ended(model):
    pixels, ids, image_mask = batch(b=1, t=2 + Q + 3, seed=12)
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask)
    new = model.generate(**kwargs, max_new_tokens=3)[0, ids.shape[1] :].tolist()
    eos = new[-1]
    first = new.index(eos)  # where greedy decoding first emits it
    stopped = model.generate(**kwargs, max_new_tokens=10, eos_token_id=eos)
    assert stopped.shape[1] == ids.shape[1] + first + 1 and int(stopped[0, -1]) == eos


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    pixels, ids, image_mask = batch(b=2, t=2 + Q + 2, seed=3)
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask, max_new_tokens=8)
    a = model.generate(**kwargs, do_sample=True, generator=torch.Generator().manual_seed(7))
    b = model.generate(**kwargs, do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(**kwargs, do_sample=True, top_k=1), model.generate(**kwargs))


def grads_of(model: KosmosModel, seed: int) -> dict[str, torch.Tensor]:
    pixels, ids, image_mask = batch(seed=4)
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both runs
    model(pixels, ids, image_mask, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_model("tiny")  # dropout 0.1 stays on: recomputation must replay the same masks
    ckpt = create_model("tiny")
    ckpt.load_state_dict(plain.state_dict())
    set_activation_checkpointing(ckpt)
    assert ckpt.config == plain.config  # a run switch: the architecture's config does not record it
    assert all(block.checkpointing for block in [*ckpt.vision.blocks, *ckpt.blocks])
    g_plain, g_ckpt = grads_of(plain, 5), grads_of(ckpt, 5)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) == len(list(plain.parameters()))
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_vision_encoder_gets_no_gradients():
    torch.manual_seed(0)
    model = create_model("tiny")
    freeze_vision(model)
    grads = grads_of(model, 1)
    assert not any(name.startswith("vision.") for name in grads)
    assert "connector.dense.weight" in grads and "blocks.0.ffn.fc1.weight" in grads
    assert model.num_parameters(trainable_only=True) < model.num_parameters()
    freeze_vision(model, trainable_blocks=1)
    trained = {
        name.split(".")[1] + "." + name.split(".")[2] for name in grads_of(model, 1) if name.startswith("vision.")
    }
    assert trained == {"blocks.1", "ln_post.weight", "ln_post.bias"}
    freeze_vision(model, trainable_blocks=-1)
    assert all(p.requires_grad for p in model.vision.parameters())
    with pytest.raises(ValueError, match="3 trainable vision blocks"):
        freeze_vision(model, trainable_blocks=3)


def test_multiway_ffn_routes_image_and_text_positions():
    cfg = model_config("tiny", multiway_ffn=True)
    torch.manual_seed(0)
    block = DecoderBlock(cfg.text, multiway=True).eval()
    assert block.ffn_image.fc1.weight.shape == block.ffn.fc1.weight.shape == (256, 64)
    x = torch.randn(2, 10, 64)
    image_mask = torch.zeros(2, 10, dtype=torch.bool)
    image_mask[:, 2:6] = True
    with torch.no_grad():
        before = block(x, is_causal=True, image_mask=image_mask)
        block.ffn_image.fc2.bias.add_(1.0)
        after_image = block(x, is_causal=True, image_mask=image_mask)
        block.ffn.fc2.bias.add_(1.0)
        after_both = block(x, is_causal=True, image_mask=image_mask)
    changed = (after_image - before).abs().amax(-1) > 0.5
    assert torch.equal(changed, image_mask)  # only image positions use ffn_image
    changed = (after_both - after_image).abs().amax(-1) > 0.5
    assert torch.equal(changed, ~image_mask)  # only text positions use ffn
    model = create_model("tiny", multiway_ffn=True).eval()
    assert "blocks.1.ffn_image.fc2.weight" in model.state_dict()
    pixels, ids, image_mask = batch()
    out = model(pixels, ids, image_mask, labels=ids)
    assert torch.isfinite(out.loss)
    assert model.generate(pixels, ids, image_mask, max_new_tokens=3).shape == (2, 31)


def test_sincos_location_embeddings():
    model = create_model("tiny")
    apply_init(model, loc_embed="sincos")
    cfg = model.config
    loc = model.embed_tokens.weight[cfg.loc_token_start : cfg.loc_token_start + 1024].detach()
    torch.testing.assert_close(loc.pow(2).mean().sqrt(), torch.tensor(cfg.init_std))
    unit = F.normalize(loc, dim=-1)
    # Similarity falls with distance along a row and down a column (sin-cos codes are not monotone beyond that).
    along_row = [float(unit[0] @ unit[d]) for d in (1, 4, 16)]
    down_column = [float(unit[0] @ unit[32 * d]) for d in (1, 4, 16)]
    assert along_row == sorted(along_row, reverse=True) and down_column == sorted(down_column, reverse=True)
    assert along_row[0] - along_row[-1] > 0.15 and down_column[0] - down_column[-1] > 0.15
    plain = create_model("tiny")
    assert not torch.allclose(plain.embed_tokens.weight[1024:], model.embed_tokens.weight[1024:])
    with pytest.raises(ValueError, match="do not fit"):
        apply_init(create_model("tiny", loc_token_start=1500), loc_embed="sincos")


def own_block_attention(model: KosmosModel, pixels: torch.Tensor) -> torch.Tensor:
    """Mean attention mass each latent query puts on the patches of its own block, per image: (B,)."""
    con, cfg = model.connector, model.config
    with torch.no_grad():
        feats = F.normalize(model.vision(pixels), dim=-1)
        h = con.dense(feats)
        memory = torch.cat([h, con.latent_query.expand(h.shape[0], -1, -1)], dim=1)
        B, D, H = h.shape[0], cfg.text.dim, cfg.text.heads
        q = con.q_proj(con.latent_query).view(-1, H, D // H).transpose(0, 1)  # (H, Q, hd)
        k = con.kv_proj(memory)[..., :D].view(B, -1, H, D // H).transpose(1, 2)  # (B, H, N+Q, hd)
        probs = (q @ k.transpose(-1, -2) / (D // H) ** 0.5).softmax(-1).mean(1)  # (B, Q, N+Q)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    blocks = patch_blocks(grid, int(cfg.latent_query_num**0.5))
    own = torch.zeros(cfg.latent_query_num, probs.shape[-1], dtype=torch.bool)
    own[blocks, 1 + torch.arange(grid * grid)] = True
    return (probs * own).sum(-1).mean(-1)


def test_block_pool_connector_init_pools_one_block_per_query():
    torch.manual_seed(0)
    pooled = create_model("tiny").eval()
    apply_init(pooled, connector="block_pool")
    plain = create_model("tiny").eval()
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(3, 3, 64, 64, generator=g)
    smooth = F.interpolate(torch.randn(3, 3, 8, 8, generator=g), size=64, mode="bilinear")  # blob-like images
    for pixels in (noise, smooth):
        assert own_block_attention(pooled, pixels).min() > 0.8
        assert own_block_attention(plain, pixels).max() < 0.2  # the test can fail: random init spreads attention
    with torch.no_grad():  # the pooled embeddings still carry the image content
        e = pooled.encode_image(torch.cat([noise[:1], smooth[:1]]))
    assert (e[0] - e[1]).norm() > 0.2 * e[0].norm()
    torch.testing.assert_close(e.pow(2).mean().sqrt(), torch.tensor(0.02), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="square"):
        apply_init(create_model("tiny", latent_query_num=12), connector="block_pool")


def test_all_init_options_together_train(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", text={"dropout": 0.0})
    apply_init(model, connector="block_pool", loc_embed="sincos")
    freeze_vision(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    pixels, ids, image_mask = batch(seed=6)
    losses = []
    for _ in range(8):
        loss = model(pixels, ids, image_mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_checkpoint_round_trip(tmp_path, model):
    pixels, ids, image_mask = batch()
    save_model(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck").eval()
    assert loaded.config == model.config
    assert all(p.requires_grad for p in loaded.parameters()) and loaded.pos_table.shape == model.pos_table.shape
    with torch.no_grad():
        assert torch.equal(loaded(pixels, ids, image_mask).logits, model(pixels, ids, image_mask).logits)
    quiet = load_model(tmp_path / "ck", text={"dropout": 0.0})
    assert quiet.config.text.dropout == 0.0 and quiet.config.vision == model.config.vision
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "kosmos-2"}')
    with pytest.raises(ValueError, match="convert --from-hf"):
        load_model(tmp_path / "hf")


def test_bf16_autocast_with_padding_stays_finite(model):
    pixels, ids, image_mask = batch(b=3, seed=7)
    ids, image_mask, attention = left_padded(ids, image_mask, [0, 4, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixels, ids, image_mask, attention, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_config_round_trips_through_dict():
    cfg = model_config("tiny", multiway_ffn=True)
    assert KosmosConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown KosmosConfig fields"):
        KosmosConfig.from_dict({**cfg.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, heads=5))
    with pytest.raises(ValueError, match="unknown initialisation"):
        apply_init(create_model("tiny"), connector="magic")


def test_checkpoint_with_the_old_run_fields_still_loads(tmp_path, model):
    """Checkpoints written before the model config was the architecture only carry run flags in config.json."""
    save_model(model, tmp_path / "old")
    path = tmp_path / "old" / CONFIG_NAME
    payload = json.loads(path.read_text())
    payload["config"].update(freeze_vision=True, gradient_checkpointing=True, connector_init="block_pool",
                             loc_embed_init="sincos")  # fmt: skip
    path.write_text(json.dumps(payload))
    loaded = load_model(tmp_path / "old")
    assert loaded.config == model.config
    assert all(p.requires_grad for p in loaded.parameters())  # the old flags do not freeze anything any more
    assert not any(block.checkpointing for block in loaded.blocks)
    pixels, ids, image_mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixels, ids, image_mask).logits, model(pixels, ids, image_mask).logits)
    save_model(loaded, tmp_path / "new")  # and what it writes back is the architecture only
    written = json.loads((tmp_path / "new" / CONFIG_NAME).read_text())["config"]
    assert not {"freeze_vision", "gradient_checkpointing", "connector_init", "loc_embed_init"} & set(written)


def test_right_padded_training_batches_give_the_same_loss_without_the_mask():
    torch.manual_seed(0)
    model = create_model("tiny", text={"dropout": 0.0, "attention_dropout": 0.0})
    pixels, ids, image_mask = batch(b=3, seed=8)
    attention = torch.ones_like(ids)
    for row, n in ((1, 5), (2, 2)):  # right padding
        ids[row, -n:], attention[row, -n:] = 1, 0
    labels = ids.masked_fill(attention.eq(0), -100)
    train_loss = model.train()(pixels, ids, image_mask, attention, labels=labels).loss  # mask dropped: flash path
    with torch.no_grad():
        eval_out = model.eval()(pixels, ids, image_mask, attention, labels=labels)  # mask kept, as HF does
    torch.testing.assert_close(train_loss, eval_out.loss, atol=1e-6, rtol=1e-6)


def test_loss_without_logits_equals_the_full_loss_and_gradients():
    torch.manual_seed(0)
    model = create_model("tiny", text={"dropout": 0.0, "attention_dropout": 0.0})
    pixels, ids, image_mask = batch(seed=9)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) <= 2 + Q, -100)
    full = model(pixels, ids, image_mask, labels=labels)
    full.loss.backward()
    grad = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    lean = model(pixels, ids, image_mask, labels=labels, return_logits=False)
    lean.loss.backward()
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(model.embed_tokens.weight.grad, grad)
    with pytest.raises(ValueError, match="return_logits"):
        model(pixels, ids, image_mask, return_logits=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_step_and_generation():
    torch.manual_seed(0)
    model = create_model("tiny").cuda()
    pixels, ids, image_mask = (t.cuda() for t in batch(b=3, seed=10))
    ids, image_mask, attention = left_padded(ids, image_mask, [0, 3, 1])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(pixels, ids, image_mask, attention, labels=ids, return_logits=False).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(pixels, ids, image_mask, attention, max_new_tokens=5)
    assert out.shape == (3, ids.shape[1] + 5)
