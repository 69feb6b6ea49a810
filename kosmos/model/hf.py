"""Conversion between our checkpoints and Hugging Face's ``Kosmos2ForConditionalGeneration`` (and CLIP towers).

The library behind ``kosmos convert`` (``kosmos/cli/convert.py``). The name mapping is one
table (``_key_pairs``) read in both directions: our fused projections (qkv, kv) are HF's separate q/k/v weights
concatenated in that order. Reading needs only ``config.json`` and the weight files, not transformers itself.
Tokenizer and processor files found beside the weights are copied across unchanged.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kosmos.model.checkpoint import load_config, load_state_dict, save_checkpoint
from kosmos.model.config import KosmosConfig, TextConfig, VisionConfig
from kosmos.model.model import KosmosModel

# Files of a HF Kosmos-2 folder that are not weights but belong with them.
SIDE_FILES = (
    "sentencepiece.bpe.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
# Derived buffers some HF checkpoints carry: never weights.
_DERIVED_SUFFIXES = ("position_ids", "embed_positions.weights")
_HF_LM_HEAD = "text_model.lm_head.weight"
_HF_EMBED = "text_model.model.embed_tokens.weight"

# Kosmos2TextConfig / Kosmos2VisionConfig defaults, for keys a config.json leaves out.
_HF_TEXT_DEFAULTS = {
    "vocab_size": 65037, "max_position_embeddings": 2048, "embed_dim": 2048, "layers": 24, "ffn_dim": 8192,
    "attention_heads": 32, "activation_function": "gelu", "dropout": 0.1, "attention_dropout": 0.1,
    "activation_dropout": 0.0, "layerdrop": 0.0, "layer_norm_eps": 1e-5, "init_std": 0.02, "scale_embedding": True,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "add_cross_attention": False,
}  # fmt: skip
_HF_VISION_DEFAULTS = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
}  # fmt: skip


# ----- configs -----


def hf_config_to_ours(hf: dict) -> KosmosConfig:
    """A Kosmos-2 ``config.json`` dict -> KosmosConfig. Settings our model does not implement raise ValueError."""
    if hf.get("model_type") not in (None, "kosmos-2"):
        raise ValueError(f"not a Kosmos-2 config (model_type {hf.get('model_type')!r})")
    t = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if t["activation_function"] != "gelu" or v["hidden_act"] != "quick_gelu":
        raise ValueError(f"unsupported activations: text {t['activation_function']}, vision {v['hidden_act']}")
    if t["add_cross_attention"]:
        raise ValueError("add_cross_attention=True is not supported")
    if t["layerdrop"]:
        warnings.warn(f"layerdrop={t['layerdrop']} is not implemented; training will not drop layers", stacklevel=2)
    eos = t["eos_token_id"][0] if isinstance(t["eos_token_id"], list) else t["eos_token_id"]
    for key in ("image_size", "patch_size"):
        if isinstance(v[key], (list, tuple)):
            if len(set(v[key])) != 1:
                raise ValueError(f"non-square {key} {v[key]} is not supported")
            v[key] = v[key][0]
    text = TextConfig(
        vocab_size=t["vocab_size"], max_positions=t["max_position_embeddings"], dim=t["embed_dim"],
        layers=t["layers"], heads=t["attention_heads"], ffn_dim=t["ffn_dim"], dropout=t["dropout"],
        attention_dropout=t["attention_dropout"], activation_dropout=t["activation_dropout"],
        layer_norm_eps=t["layer_norm_eps"], scale_embedding=t["scale_embedding"], pad_token_id=t["pad_token_id"],
        bos_token_id=t["bos_token_id"], eos_token_id=eos,
    )  # fmt: skip
    vision = VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        layer_norm_eps=v["layer_norm_eps"], num_channels=v["num_channels"], attention_dropout=v["attention_dropout"],
    )  # fmt: skip
    bins = 32
    # The location tokens are the last bins**2 ids of the released vocabulary (64013 = 65037 - 1024).
    return KosmosConfig(
        vision=vision,
        text=text,
        latent_query_num=hf.get("latent_query_num", 64),
        loc_token_start=max(text.vocab_size - bins * bins, 0),
        loc_bins=bins,
        init_std=t["init_std"],
    )


def our_config_to_hf(cfg: KosmosConfig) -> dict:
    """KosmosConfig -> a ``config.json`` dict that ``Kosmos2ForConditionalGeneration.from_pretrained`` reads."""
    if cfg.multiway_ffn:
        raise ValueError("a multiway-FFN model has no Hugging Face Kosmos-2 counterpart")
    t, v = cfg.text, cfg.vision
    text = {
        "model_type": "kosmos_2_text_model", "vocab_size": t.vocab_size, "max_position_embeddings": t.max_positions,
        "embed_dim": t.dim, "layers": t.layers, "ffn_dim": t.ffn_dim, "attention_heads": t.heads,
        "activation_function": "gelu", "dropout": t.dropout, "attention_dropout": t.attention_dropout,
        "activation_dropout": t.activation_dropout, "layerdrop": 0.0, "layer_norm_eps": t.layer_norm_eps,
        "init_std": cfg.init_std, "scale_embedding": t.scale_embedding, "use_cache": True,
        "tie_word_embeddings": True, "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
    }  # fmt: skip
    vision = {
        "model_type": "kosmos_2_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": v.num_channels,
        "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "quick_gelu",
        "layer_norm_eps": v.layer_norm_eps, "attention_dropout": v.attention_dropout, "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }  # fmt: skip
    return {
        "architectures": ["Kosmos2ForConditionalGeneration"],
        "model_type": "kosmos-2",
        "latent_query_num": cfg.latent_query_num,
        "tie_word_embeddings": True,
        "text_config": text,
        "vision_config": vision,
    }


# ----- weights -----


def _vision_pairs(layers: int, ours: str, hf: str) -> Iterator[tuple[str, list[str]]]:
    yield f"{ours}patch_embed.weight", [f"{hf}embeddings.patch_embedding.weight"]
    yield f"{ours}class_embedding", [f"{hf}embeddings.class_embedding"]
    yield f"{ours}pos_embed", [f"{hf}embeddings.position_embedding.weight"]
    for w in ("weight", "bias"):
        yield f"{ours}ln_pre.{w}", [f"{hf}pre_layrnorm.{w}"]
        yield f"{ours}ln_post.{w}", [f"{hf}post_layernorm.{w}"]
        for i in range(layers):
            o, h = f"{ours}blocks.{i}.", f"{hf}encoder.layers.{i}."
            yield f"{o}attn.qkv.{w}", [f"{h}self_attn.{p}_proj.{w}" for p in "qkv"]
            yield f"{o}attn.out_proj.{w}", [f"{h}self_attn.out_proj.{w}"]
            yield f"{o}ln1.{w}", [f"{h}layer_norm1.{w}"]
            yield f"{o}ln2.{w}", [f"{h}layer_norm2.{w}"]
            yield f"{o}mlp.fc1.{w}", [f"{h}mlp.fc1.{w}"]
            yield f"{o}mlp.fc2.{w}", [f"{h}mlp.fc2.{w}"]


def _key_pairs(cfg: KosmosConfig) -> Iterator[tuple[str, list[str]]]:
    """(our key, HF keys whose dim-0 concatenation it is) for every weight of a non-multiway model."""
    yield from _vision_pairs(cfg.vision.layers, "vision.", "vision_model.model.")
    yield "embed_tokens.weight", [_HF_EMBED]
    yield "connector.latent_query", ["image_to_text_projection.latent_query"]
    for w in ("weight", "bias"):
        c = "image_to_text_projection."
        yield f"connector.dense.{w}", [f"{c}dense.{w}"]
        yield f"connector.q_proj.{w}", [f"{c}x_attn.q_proj.{w}"]
        yield f"connector.kv_proj.{w}", [f"{c}x_attn.k_proj.{w}", f"{c}x_attn.v_proj.{w}"]
        yield f"connector.out_proj.{w}", [f"{c}x_attn.out_proj.{w}"]
        yield f"ln_f.{w}", [f"text_model.model.layer_norm.{w}"]
        for i in range(cfg.text.layers):
            o, h = f"blocks.{i}.", f"text_model.model.layers.{i}."
            yield f"{o}attn.qkv.{w}", [f"{h}self_attn.{p}_proj.{w}" for p in "qkv"]
            yield f"{o}attn.out_proj.{w}", [f"{h}self_attn.out_proj.{w}"]
            yield f"{o}attn.inner_ln.{w}", [f"{h}self_attn.inner_attn_ln.{w}"]
            yield f"{o}ln_attn.{w}", [f"{h}self_attn_layer_norm.{w}"]
            yield f"{o}ln_ffn.{w}", [f"{h}final_layer_norm.{w}"]
            yield f"{o}ffn.fc1.{w}", [f"{h}ffn.fc1.{w}"]
            yield f"{o}ffn.ln.{w}", [f"{h}ffn.ffn_layernorm.{w}"]
            yield f"{o}ffn.fc2.{w}", [f"{h}ffn.fc2.{w}"]


def _is_derived(key: str) -> bool:
    return key.endswith(_DERIVED_SUFFIXES)


def hf_state_dict_to_ours(sd: dict[str, torch.Tensor], cfg: KosmosConfig) -> dict[str, torch.Tensor]:
    """HF ``Kosmos2ForConditionalGeneration`` weights -> ours. Missing or unknown keys raise ValueError.

    For a multiway config, the image FFNs start as copies of the text FFNs (BEiT-3's start from a text model).
    """
    sd = {k: v for k, v in sd.items() if not _is_derived(k)}
    if _HF_LM_HEAD in sd:  # tied: accept a stored copy only if it is the embedding
        head = sd.pop(_HF_LM_HEAD)
        if _HF_EMBED in sd and not torch.equal(head, sd[_HF_EMBED]):
            raise ValueError("text_model.lm_head.weight differs from the token embeddings; this model ties them")
    out, used = {}, set()
    for ours, hf_keys in _key_pairs(cfg):
        missing = [k for k in hf_keys if k not in sd]
        if missing:
            raise ValueError(f"HF checkpoint lacks {missing[0]} (and {len(missing) - 1} more in this group)")
        out[ours] = torch.cat([sd[k] for k in hf_keys]) if len(hf_keys) > 1 else sd[hf_keys[0]]
        used.update(hf_keys)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"HF checkpoint has {len(unexpected)} keys this config does not use, e.g. {unexpected[:3]}")
    if cfg.multiway_ffn:
        for i in range(cfg.text.layers):
            for name in ("fc1.weight", "fc1.bias", "ln.weight", "ln.bias", "fc2.weight", "fc2.bias"):
                out[f"blocks.{i}.ffn_image.{name}"] = out[f"blocks.{i}.ffn.{name}"].clone()
    return out


def our_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: KosmosConfig) -> dict[str, torch.Tensor]:
    """Our weights -> HF names (the tied LM head is left out, as ``save_pretrained`` does)."""
    if cfg.multiway_ffn:
        raise ValueError("a multiway-FFN model has no Hugging Face Kosmos-2 counterpart")
    out, used = {}, set()
    for ours, hf_keys in _key_pairs(cfg):
        if ours not in sd:
            raise ValueError(f"checkpoint lacks {ours}")
        parts = sd[ours].chunk(len(hf_keys)) if len(hf_keys) > 1 else [sd[ours]]
        out.update({k: p.contiguous() for k, p in zip(hf_keys, parts, strict=True)})
        used.add(ours)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"checkpoint has keys with no HF counterpart, e.g. {unexpected[:3]}")
    return out


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    d = Path(directory)
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(d / shard)).items()}
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, safetensors index or pytorch_model.bin in {d}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    return json.loads(path.read_text(encoding="utf-8"))


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return sd if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def convert_from_hf(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> KosmosConfig:
    """HF Kosmos-2 folder -> our checkpoint folder (weights, config, tokenizer files)."""
    src, out = Path(src), Path(out)
    cfg = hf_config_to_ours(_read_json(src / "config.json"))
    sd = _cast(hf_state_dict_to_ours(read_hf_weights(src), cfg), dtype)
    save_checkpoint(out, sd, cfg, metadata={"converted_from": "huggingface"})
    _copy_side_files(src, out)
    return cfg


def convert_to_hf(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> dict:
    """Our checkpoint folder -> a folder ``Kosmos2ForConditionalGeneration.from_pretrained`` loads."""
    src, out = Path(src), Path(out)
    cfg = load_config(src)
    hf_sd = _cast(our_state_dict_to_hf(load_state_dict(src), cfg), dtype)
    hf_cfg = our_config_to_hf(cfg)
    hf_cfg["dtype"] = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
    _copy_side_files(src, out)
    return hf_cfg


# ----- CLIP vision towers -----


def load_clip_vision(model: KosmosModel, directory: str | Path) -> int:
    """Load a HF ``CLIPVisionModel`` or ``CLIPModel`` folder's vision tower into ``model.vision``.

    The tower must have our geometry (width, layers, heads, MLP, image and patch size) and quick_gelu, as OpenAI's
    CLIP ViT-L/14 has; anything else raises ValueError. Returns the number of tensors loaded.
    """
    d = Path(directory)
    hf = _read_json(d / "config.json")
    vc = hf.get("vision_config", hf) if hf.get("model_type") == "clip" else hf
    if hf.get("model_type") not in ("clip", "clip_vision_model"):
        raise ValueError(f"{d} is not a CLIP folder (model_type {hf.get('model_type')!r})")
    v = model.config.vision
    theirs = {
        "width": vc.get("hidden_size", 768), "layers": vc.get("num_hidden_layers", 12),
        "heads": vc.get("num_attention_heads", 12), "mlp_dim": vc.get("intermediate_size", 3072),
        "image_size": vc.get("image_size", 224), "patch_size": vc.get("patch_size", 32),
        "num_channels": vc.get("num_channels", 3),
    }  # fmt: skip
    wrong = {k: (getattr(v, k), x) for k, x in theirs.items() if getattr(v, k) != x}
    if wrong:
        raise ValueError(f"CLIP tower does not match the model (ours, theirs): {wrong}")
    if vc.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"CLIP tower uses {vc['hidden_act']}; this model's vision encoder uses quick_gelu")
    sd = read_hf_weights(d)
    # CLIPModel folders prefix the tower with "vision_model."; CLIPVisionModel folders do in older transformers only.
    prefixes = [p for p in ("vision_model.", "") if f"{p}embeddings.patch_embedding.weight" in sd]
    if not prefixes:
        raise ValueError(f"no CLIP vision tower weights in {d}")
    vision_sd = {}
    for ours, hf_keys in _vision_pairs(v.layers, "", prefixes[0]):
        missing = [k for k in hf_keys if k not in sd]
        if missing:
            raise ValueError(f"CLIP checkpoint lacks {missing[0]}")
        vision_sd[ours] = torch.cat([sd[k] for k in hf_keys]) if len(hf_keys) > 1 else sd[hf_keys[0]]
    model.vision.load_state_dict(vision_sd, strict=True)
    return len(vision_sd)
