"""Parity with Hugging Face's Kosmos2ForConditionalGeneration, through `kosmos convert` both ways."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
)

from kosmos.cli import main as kosmos_main
from kosmos.model.checkpoint import load_model, save_model
from kosmos.model.hf import (
    hf_config_to_ours,
    hf_state_dict_to_ours,
    load_clip_vision,
    our_state_dict_to_hf,
)
from kosmos.model.registry import create_model

VOCAB, LATENTS, IMAGE = 200, 4, 32
B, T = 3, 16
SLOTS = slice(2, 2 + LATENTS)


# HF's eager attention is the reference: in some transformers releases (5.17 among them) the SDPA path treats the
# connector's attention as causal (huggingface/transformers#39037 describes it), which the eager path never does.
ATTN = "eager"


def tiny_hf_config() -> Kosmos2Config:
    text = dict(vocab_size=VOCAB, embed_dim=32, layers=2, ffn_dim=64, attention_heads=4, max_position_embeddings=96)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=8,
    )
    cfg = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=LATENTS)
    cfg._attn_implementation = ATTN
    return cfg


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = Kosmos2ForConditionalGeneration(tiny_hf_config()).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorms included) so each mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def folders(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("kosmos_convert")
    hf_dir, ours_dir = root / "hf", root / "ours"
    hf_model.save_pretrained(hf_dir)
    assert kosmos_main(["convert", "--from-hf", str(hf_dir), "--out", str(ours_dir)]) == 0
    return hf_dir, ours_dir


@pytest.fixture(scope="module")
def ours(folders):
    return load_model(folders[1]).eval()


def make_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    ids[:, 0], ids[:, 1], ids[:, SLOTS.stop] = 0, 150, 151  # <s> <image> [slots] </image>
    image_mask = torch.zeros(B, T, dtype=torch.long)
    image_mask[:, SLOTS] = 1
    pixels = torch.randn(B, 3, IMAGE, IMAGE, generator=g)
    return pixels, ids, image_mask


def left_pad(ids, image_mask, pads: list[int]):
    """Shift row b right by pads[b], filling with pad (1), as a batched prompt is padded for generation."""
    ids, image_mask = ids.clone(), image_mask.clone()
    attention = torch.ones_like(ids)
    for b, n in enumerate(pads):
        if n:
            ids[b] = torch.cat([torch.ones(n, dtype=ids.dtype), ids[b, :-n]])
            image_mask[b] = torch.cat([torch.zeros(n, dtype=image_mask.dtype), image_mask[b, :-n]])
            attention[b, :n] = 0
    return ids, image_mask, attention


def test_logits_match_hf(hf_model, ours):
    pixels, ids, image_mask = make_inputs()
    with torch.no_grad():
        theirs = hf_model(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask).logits
        mine = ours(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask).logits
    assert mine.shape == (B, T, VOCAB)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_logits_match_hf_with_padding(hf_model, ours):
    pixels, ids, image_mask = make_inputs(2)
    ids, image_mask, attention = left_pad(ids, image_mask, [0, 3, 1])
    ids[2, -2:], attention[2, -2:] = 1, 0  # and right padding in one row
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask, attention_mask=attention)
    with torch.no_grad():
        theirs, mine = hf_model(**kwargs).logits, ours(**kwargs).logits
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)  # every position, pads included


def test_loss_matches_hf(hf_model, ours):
    pixels, ids, image_mask = make_inputs(3)
    labels = ids.masked_fill(torch.arange(T) <= SLOTS.stop, -100)  # no loss up to </image>
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask)
    with torch.no_grad():
        theirs = hf_model(**kwargs, labels=labels).loss
        mine = ours(**kwargs, labels=labels).loss
        by_mask = ours(**kwargs, loss_mask=labels.ne(-100)).loss
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_mask, mine)


# Random tiny models repeat themselves under plain greedy decoding; the n-gram ban makes every step depend on the
# whole history, and an EOS taken from the first row's third greedy token exercises pad-after-EOS.
@pytest.mark.parametrize(("no_repeat", "eos_from_step"), [(0, None), (2, None), (0, 2)])
def test_greedy_generation_matches_hf(hf_model, ours, no_repeat, eos_from_step):
    pixels, ids, image_mask = make_inputs(4)
    ids, image_mask, attention = left_pad(ids[:, : SLOTS.stop + 3], image_mask[:, : SLOTS.stop + 3], [0, 2, 1])
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask, attention_mask=attention)
    eos_kw = {}
    if eos_from_step is not None:
        plain = ours.generate(**kwargs, max_new_tokens=eos_from_step + 1)
        eos_kw["eos_token_id"] = int(plain[0, ids.shape[1] + eos_from_step])
    with torch.no_grad():
        theirs = hf_model.generate(
            **kwargs, max_new_tokens=16, do_sample=False, num_beams=1, no_repeat_ngram_size=no_repeat, min_length=0,
            **eos_kw,
        )  # fmt: skip
        mine = ours.generate(**kwargs, max_new_tokens=16, no_repeat_ngram_size=no_repeat, **eos_kw)
    assert mine.shape[1] > ids.shape[1]
    if eos_kw:  # the first row ends at its EOS and is padded from there on
        assert (mine[0, ids.shape[1] + eos_from_step + 1 :] == 1).all()
    assert torch.equal(mine, theirs)


def test_to_hf_loads_without_missing_keys_and_matches(folders, tmp_path):
    hf_dir, ours_dir = folders
    back = tmp_path / "back"
    assert kosmos_main(["convert", "--to-hf", str(ours_dir), "--out", str(back)]) == 0
    reloaded, info = Kosmos2ForConditionalGeneration.from_pretrained(
        back, output_loading_info=True, attn_implementation=ATTN
    )
    assert info["missing_keys"] in (set(), []) and info["unexpected_keys"] in (set(), [])
    assert not info.get("mismatched_keys")
    # Against the original folder loaded the same way (from_pretrained may post-process weights, e.g. a pad row).
    original = Kosmos2ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=ATTN)
    original.load_state_dict(reloaded.state_dict(), strict=True)  # the same keys, no missing or unexpected
    original_sd = Kosmos2ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=ATTN).state_dict()
    assert all(torch.equal(v, original_sd[k]) for k, v in reloaded.state_dict().items())
    pixels, ids, image_mask = make_inputs(5)
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**kwargs).logits, original.eval()(**kwargs).logits, atol=0, rtol=0)


def test_state_dict_mapping_round_trips(hf_model):
    cfg = hf_config_to_ours(tiny_hf_config().to_dict())
    sd = {k: v for k, v in hf_model.state_dict().items() if k != "text_model.lm_head.weight"}
    back = our_state_dict_to_hf(hf_state_dict_to_ours(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_untied_or_unknown_hf_weights_are_refused(hf_model):
    cfg = hf_config_to_ours(tiny_hf_config().to_dict())
    sd = dict(hf_model.state_dict())
    sd["text_model.lm_head.weight"] = sd["text_model.lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head"):
        hf_state_dict_to_ours(sd, cfg)
    sd = dict(hf_model.state_dict())
    sd["image_to_text_projection.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not use"):
        hf_state_dict_to_ours(sd, cfg)
    del sd["image_to_text_projection.extra.weight"], sd["text_model.model.layer_norm.bias"]
    with pytest.raises(ValueError, match="lacks"):
        hf_state_dict_to_ours(sd, cfg)


def test_multiway_conversion_starts_image_ffn_from_text_ffn(hf_model, ours):
    import dataclasses

    cfg = dataclasses.replace(hf_config_to_ours(tiny_hf_config().to_dict()), multiway_ffn=True)
    sd = hf_state_dict_to_ours(hf_model.state_dict(), cfg)
    from kosmos.model.model import KosmosModel

    multiway = KosmosModel(cfg).eval()
    multiway.load_state_dict(sd, strict=True)
    pixels, ids, image_mask = make_inputs(6)
    kwargs = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask)
    with torch.no_grad():
        torch.testing.assert_close(multiway(**kwargs).logits, ours(**kwargs).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiway"):
        our_state_dict_to_hf(sd, cfg)


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert kosmos_main(["convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    model = create_model("tiny", multiway_ffn=True)
    save_model(model, tmp_path / "mw")
    assert kosmos_main(["convert", "--to-hf", str(tmp_path / "mw"), "--out", str(tmp_path / "o")]) == 2
    assert "multiway" in capsys.readouterr().err
    assert kosmos_main(["convert", "--to-hf", str(tmp_path / "mw"), "--out", str(tmp_path / "mw")]) == 2  # no clobber


def test_clip_vision_weights_load_into_the_vision_tower(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    v = model.config.vision
    clip_cfg = CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu", projection_dim=16,
    )  # fmt: skip
    clip = CLIPVisionModel(clip_cfg).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    clip.save_pretrained(tmp_path / "clip")
    assert load_clip_vision(model, tmp_path / "clip") == len(model.vision.state_dict())
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        hidden = clip(pixel_values=pixels).last_hidden_state
        post_ln = next(m for name, m in clip.named_modules() if name.endswith("post_layernorm"))
        expected = post_ln(hidden)  # Kosmos-2 post-LNs every token
        torch.testing.assert_close(model.vision(pixels), expected, atol=1e-5, rtol=0)

    # A full CLIPModel folder (text tower beside it, "vision_model." prefix) loads the same tower.
    text_cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    full = CLIPModel(CLIPConfig(vision_config=clip_cfg.to_dict(), text_config=text_cfg, projection_dim=16))
    tower = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}
    full.vision_model.load_state_dict(tower)
    full.save_pretrained(tmp_path / "clip_full")
    fresh = create_model("tiny").eval()
    load_clip_vision(fresh, tmp_path / "clip_full")
    with torch.no_grad():
        torch.testing.assert_close(fresh.vision(pixels), expected, atol=1e-5, rtol=0)

    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers"):
        load_clip_vision(model, tmp_path / "clip")
