"""Grounding DINO (Hugging Face transformers) as the GRIT detector.

One call grounds a batch of (image, phrases). Each image's unique phrases go into one or more prompts
(``"chunk one . chunk two ."``, split where the text encoder's limit would be passed); every (image, prompt)
pair is one item of a forward pass. Items are grouped by the padded shape of their image, which depends on the
image alone (:func:`~grit_pipeline.grounding.preprocess.padded_shape`): Swin's attention windows see the padding,
so padding an image to the largest image of its batch would make its boxes depend on its neighbours.

Images arrive as ``uint8`` arrays already resized on CPU workers; normalisation and padding happen here, on the
device, after a pinned-memory, non-blocking transfer of the ``uint8`` bytes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding.batching import ShapeQueues
from grit_pipeline.grounding.compiled import CompiledForward, text_bucket
from grit_pipeline.grounding.detector import Detection, GroundingInput, GroundingResult
from grit_pipeline.grounding.device_nms import DEFAULT_CAP, ItemCandidates, finish_sorted, queue_selection
from grit_pipeline.grounding.precision import (
    autocast,
    autocast_dtype,
    half_weights_wanted,
    resolve_device,
    text_position_embeddings_are_integer,
)
from grit_pipeline.grounding.preprocess import DEFAULT_PAD_MULTIPLE, padded_shape, prepare_image, target_size
from grit_pipeline.grounding.scoring import (
    Candidates,
    Prompt,
    build_prompt,
    finalize,
    phrase_scores,
    plan_prompts,
    prompt_phrase,
    select_candidates,
    token_phrase_index,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Checkpoint types this detector runs: both share the outputs (query-token logits, boxes) and the prompt format.
MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")
RANDOM_TINY_MODEL_ID = "random-tiny-grounding-dino"
# Stride of the finest feature map Grounding DINO's backbones give (Swin stage 2, ResNet layer 2). The two-stage
# encoder picks its ``num_queries`` proposals among the feature cells, so an image needs at least that many.
FINEST_STRIDE = 8
# Text lengths are padded to a multiple of this (tensor-core friendly); padding tokens are masked in the model.
TEXT_PAD_MULTIPLE = 8


class DetectorUnavailable(RuntimeError):
    """The detector's weights cannot be loaded (no hub access, wrong path, not a Grounding DINO checkpoint)."""


@dataclass
class _Item:
    """One forward-pass item: an image with one of its prompts."""

    image: int  # sequence number of the input in the stream
    prompt: Prompt
    input_ids: list[int]
    token_phrase: np.ndarray  # (T,) position in prompt.phrase_ids, -1 for none
    ordinal: int = 0  # position among its image's items


@dataclass
class _Image:
    """An input between admission and its result: items still out, and the candidates of those returned."""

    result: GroundingResult
    alias: dict[int, list[int]]  # first index of a phrase text -> its repeats
    array: np.ndarray | None
    items: list[_Item]
    remaining: int
    parts: list = field(default_factory=list)  # (ordinal, item, candidates) per returned item


class GroundingDinoDetector:
    """Phrase grounding with a Grounding DINO checkpoint (``cfg.model``: hub id or local folder)."""

    def __init__(self, cfg: DetectorConfig, pad_multiple: int | None = None, half_weights: bool | None = None):
        self.cfg = cfg
        self.model_id = cfg.model
        self.random_weights = False
        self.pad_multiple = pad_multiple or cfg.pad_multiple or DEFAULT_PAD_MULTIPLE
        self._half_weights_request = half_weights  # None: decided by the device and the installed release
        self.half_weights = False
        self.model: Any = None
        self.compiled: CompiledForward | None = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.amp_dtype: torch.dtype | None = None
        self.notes: list[str] = []  # facts worth recording in a manifest (fallbacks, library quirks)
        # Running totals for the stage's stats: forward passes, (image, prompt) items, image and padded pixels.
        self.counters = {"forward_passes": 0, "items": 0, "pixels": 0, "padded_pixels": 0}
        # Host seconds by kind (benchmarks report them apart): assembling inputs, waiting for the device's results,
        # selecting candidates from raw outputs, and the final clip / NMS / cap.
        self.timings = {"host_inputs_s": 0.0, "device_wait_s": 0.0, "select_s": 0.0, "nms_s": 0.0}

    # ---------------------------------------------------------------------------------------------------------
    # Set-up
    # ---------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load weights and tokenizer, move them to the device, settle the precision. Once per worker."""
        if self.model is not None:
            return
        self.device = resolve_device(self.cfg.device)
        self.amp_dtype = autocast_dtype(self.cfg.dtype)
        try:
            model, tokenizer, mean, std = _load(self.cfg.model)
        except DetectorUnavailable:
            if not self.cfg.allow_random_weights:
                raise
            from grit_pipeline.grounding.tiny import build_tiny_grounding_dino

            log.warning(
                "!!! detector weights %r unavailable: using a RANDOMLY INITIALISED tiny Grounding DINO "
                "(detector.allow_random_weights=true). Its boxes are noise; do not use this output. !!!",
                self.cfg.model,
            )
            model, processor = build_tiny_grounding_dino(seed=0, max_text_len=256)
            tokenizer, mean, std = processor.tokenizer, IMAGENET_MEAN, IMAGENET_STD
            self.model_id = RANDOM_TINY_MODEL_ID
            self.random_weights = True
            self.notes.append(f"random tiny detector instead of {self.cfg.model}")
        self._install(model, tokenizer, mean, std)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, cfg: DetectorConfig, model_id: str, **kwargs) -> Any:
        """A detector around an in-memory model (benchmarks build random real-size models without saving them)."""
        det = cls(cfg, **kwargs)
        det.model_id = model_id
        det.device = resolve_device(cfg.device)
        det.amp_dtype = autocast_dtype(cfg.dtype)
        det._install(model, tokenizer, IMAGENET_MEAN, IMAGENET_STD)
        return det

    def _install(self, model: Any, tokenizer: Any, mean, std) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DetectorUnavailable(f"tokenizer of {self.model_id!r} has no character offsets (not a fast one)")
        if text_position_embeddings_are_integer(model):
            note = "this transformers release computes Grounding DINO text position embeddings in int64"
            log.warning("%s; boxes differ from later releases' (upgrade transformers)", note)
            self.notes.append(note)
        if getattr(self.cfg, "disable_torch_checks", True):
            # Read by transformers at every call; the checks only test shapes this detector builds itself.
            os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.max_text_tokens = min(self.cfg.max_text_tokens, int(model.config.max_text_len))
        self.min_canvas = FINEST_STRIDE * math.ceil(math.sqrt(int(model.config.num_queries)))
        want = self._half_weights_request
        if want is None:
            want = half_weights_wanted(self.device, self.amp_dtype, type(getattr(model, "model", model)))
        if want and self.amp_dtype is not None:
            self._try_half_weights()
        self._install_kernels()
        compile_wanted = self.cfg.compile == "on" or (self.cfg.compile == "auto" and self.device.type == "cuda")
        if compile_wanted:
            self.compiled = CompiledForward(
                self.model,
                self.cfg.max_compiled_graphs,
                self.cfg.compile_cache_dir,
                cuda_graphs=self.cfg.cuda_graphs and self.device.type == "cuda",
            )

    def _install_kernels(self) -> None:
        """The fused deformable-attention kernel where the config and the device allow it."""
        from grit_pipeline.grounding.msda_triton import install_msda_kernel

        note = install_msda_kernel(self.model, self.cfg.msda_kernel, self.device)
        if note:
            self.notes.append(note)

    def _try_half_weights(self) -> None:
        """Cast the weights to the autocast dtype if one probe pass gives finite outputs; else keep fp32."""
        self.model.to(self.amp_dtype)
        self.half_weights = True
        side = max(64, self.min_canvas)
        probe = GroundingInput(image=np.full((side, side, 3), 127, np.uint8), phrases=["a thing"])
        try:
            scores, boxes = self._launch([np.asarray(probe.image)], [self._items(probe, 0)[0][0]])
            ok = bool(torch.isfinite(boxes).all()) and not bool(torch.isnan(scores).any())
            reason = "non-finite outputs"
        except RuntimeError as exc:
            ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if not ok:
            self.model.float()
            self.half_weights = False
            note = f"{self.amp_dtype} weights failed a probe pass ({reason}); using fp32 weights under autocast"
            log.warning(note)
            self.notes.append(note)

    # ---------------------------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------------------------

    def __call__(self, batch: list[GroundingInput]) -> list[GroundingResult]:
        """One result per input, in order (the :class:`Detector` interface): :meth:`stream` over this batch."""
        return list(self.stream(batch, window=max(1, len(batch))))

    def stream(self, inputs: Iterable[GroundingInput], window: int | None = None) -> Iterator[GroundingResult]:
        """Results of ``inputs``, in order, with items queued per padded shape across inputs.

        A shape's queue is forwarded as soon as it holds ``batch_size`` items; at most ``window`` images
        (``cfg.queue_window`` by default) are held, and when the window is full the queue of the oldest image is
        forwarded as it is. Each group's results are taken one group later (the device runs the next group
        meanwhile), and each image is finalised as soon as its last item returns. Which images share a forward pass
        changes nothing in an image's boxes: only images of one padded shape are batched, and padding depends on
        the image alone.
        """
        if self.model is None:
            self.setup()
        window = max(1, window or self.cfg.queue_window)
        queues = ShapeQueues(max(1, self.cfg.batch_size))
        states: dict[int, _Image] = {}
        next_out, seq = 0, 0
        pending: list | None = None  # the launched group whose results are not taken yet

        def run(group: list[_Item]) -> None:
            nonlocal pending
            launched = self._launch_safely(group, states)
            if pending is not None:
                self._finish(pending, states)
            pending = launched

        def ready() -> Iterator[GroundingResult]:
            nonlocal next_out
            while next_out < seq and states[next_out].remaining == 0:
                yield states.pop(next_out).result
                next_out += 1

        for inp in inputs:
            state = self._admit(inp, seq)
            states[seq] = state
            if state.remaining:
                queues.add(self._padded_shape(state.array), state.items)
            seq += 1
            for group in queues.full():
                run(group)
            while seq - next_out >= window and states[next_out].remaining:
                head = states[next_out]
                group = queues.pop(self._padded_shape(head.array))
                if group:
                    run(group)
                elif pending is not None:
                    self._finish(pending, states)
                    pending = None
            yield from ready()
        for group in queues.drain():
            run(group)
        if pending is not None:
            self._finish(pending, states)
        yield from ready()

    def _admit(self, inp: GroundingInput, seq: int) -> _Image:
        """An input's state: its checked image and items, or its result at once when it has nothing to ground."""
        result = GroundingResult()
        image, error = self._checked_image(inp.image)
        items, too_long, alias = self._items(inp, seq)
        result.too_long_phrases = sorted(j for t in too_long for j in [t, *alias.get(t, [])])
        if image is None:
            result.error = error
            items = []
        return _Image(result, alias, image, items, len(items), [])

    def _checked_image(self, image: Any) -> tuple[np.ndarray | None, str]:
        """The image as the detector needs it, or None and the reason it cannot be used."""
        if image is None:
            return None, "no_image"
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
            return None, f"bad_image: expected uint8 (H, W, 3), got {array.dtype} {array.shape}"
        h, w = array.shape[:2]
        if (h, w) != target_size(h, w, self.cfg.image_short_side, self.cfg.image_long_side_max):
            # Not prepared on a CPU worker: resize here (correct, but it costs this worker's time).
            array = prepare_image(array, self.cfg)
        return array, ""

    def _items(self, inp: GroundingInput, image_index: int) -> tuple[list[_Item], list[int], dict[int, list[int]]]:
        """Prompts of one input: (items, indices of phrases too long, repeats of each first phrase)."""
        first_of: dict[str, int] = {}
        alias: dict[int, list[int]] = {}
        unique: list[int] = []
        for j, phrase in enumerate(inp.phrases):
            text = prompt_phrase(phrase) if isinstance(phrase, str) else ""  # not text: nothing to ground
            if text in first_of:
                alias.setdefault(first_of[text], []).append(j)
            else:
                first_of[text] = j
                unique.append(j)
        texts = [prompt_phrase(inp.phrases[j]) if isinstance(inp.phrases[j], str) else "" for j in unique]
        counts = [len(self.tokenizer.tokenize(t)) if t else 0 for t in texts]
        prompts, too_long_local = plan_prompts(texts, counts, self.max_text_tokens)
        items: list[_Item] = []
        too_long = [unique[k] for k in too_long_local]
        for prompt in prompts:
            global_prompt = Prompt(prompt.text, tuple(unique[k] for k in prompt.phrase_ids), prompt.spans)
            too_long += self._encode(global_prompt, image_index, items)
        return items, sorted(too_long), alias

    def _encode(self, prompt: Prompt, image_index: int, items: list[_Item]) -> list[int]:
        """Tokenize one prompt into ``items``. Should a tokenizer not add up its phrases' token counts, the prompt
        is split in two rather than truncated; returns the phrases that are too long even alone."""
        enc = self.tokenizer(prompt.text, return_offsets_mapping=True, add_special_tokens=True)
        if len(enc["input_ids"]) > self.max_text_tokens:
            if len(prompt.phrase_ids) == 1:
                return list(prompt.phrase_ids)
            half = len(prompt.phrase_ids) // 2
            texts = [prompt.text[s:e] for s, e in prompt.spans]
            too_long = []
            for part in (slice(0, half), slice(half, None)):
                too_long += self._encode(build_prompt(texts[part], prompt.phrase_ids[part]), image_index, items)
            return too_long
        index = token_phrase_index(enc["offset_mapping"], prompt.spans)
        items.append(_Item(image_index, prompt, list(enc["input_ids"]), index, len(items)))
        return []

    def _launch_safely(self, chunk: list[_Item], states: dict[int, _Image]) -> list:
        """Queue one group; on CUDA out-of-memory, halve it and retry (one item that does not fit re-raises)."""
        try:
            scores, boxes = self._launch([states[it.image].array for it in chunk], chunk)
            if self.cfg.device_postprocess:
                sel = queue_selection(
                    scores, boxes, self.cfg.box_threshold, self.cfg.min_box_side, self.cfg.nms_iou, DEFAULT_CAP
                )
                return [(chunk, sel, None)]
            return [(chunk, scores, boxes)]
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(chunk) // 2
            log.warning("out of memory on a forward pass of %d items: retrying in halves", len(chunk))
            return self._launch_safely(chunk[:half], states) + self._launch_safely(chunk[half:], states)

    def _finish(self, launched: list, states: dict[int, _Image]) -> None:
        """Take a group's results from the device and finalise every image whose last item this was."""
        for chunk, first, second in launched:
            t0 = time.perf_counter()
            if second is None:
                parts = first.fetch()
                t1 = time.perf_counter()
            else:
                scores, boxes = first.cpu(), second.cpu()
                t1 = time.perf_counter()
                parts = self._candidates(chunk, scores, boxes)
            self.timings["device_wait_s"] += t1 - t0
            self.timings["select_s"] += time.perf_counter() - t1
            t0 = time.perf_counter()
            for it, part in zip(chunk, parts):
                state = states[it.image]
                state.parts.append((it.ordinal, it, part))
                state.remaining -= 1
                if state.remaining == 0:
                    self._finalize(state)
            self.timings["nms_s"] += time.perf_counter() - t0

    def _finalize(self, state: _Image) -> None:
        """Clip, NMS, cap: on the device's sorted candidates for one-prompt images, else the host functions."""
        state.parts.sort(key=lambda p: p[0])
        if len(state.parts) == 1 and isinstance(state.parts[0][2], ItemCandidates):
            _, it, part = state.parts[0]
            state.result.num_boxes_raw = part.num_raw
            boxes, phrases, scores = finish_sorted(part, it.prompt.phrase_ids, self.cfg.max_boxes_per_phrase)
            kept = Candidates(boxes, phrases, scores)
        else:
            cands = Candidates.concat([_host_candidates(it, part) for _, it, part in state.parts])
            state.result.num_boxes_raw = sum(
                part.num_raw if isinstance(part, ItemCandidates) else len(part) for _, _, part in state.parts
            )
            kept = finalize(cands, self.cfg.nms_iou, self.cfg.max_boxes_per_phrase, self.cfg.min_box_side)
        state.result.detections = _detections(kept, state.alias)
        state.array, state.parts, state.items = None, [], []

    def _launch(self, images: list[np.ndarray], items: list[_Item]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the forward pass of one group of equal padded shape: phrase scores (B, Q, P) and boxes (B, Q, 4),
        still on the device."""
        t0 = time.perf_counter()
        pixel_values, pixel_mask = self._pixels(images)
        input_ids, attention_mask, token_phrase = self._text(items)
        self.timings["host_inputs_s"] += time.perf_counter() - t0
        self.counters["forward_passes"] += 1
        self.counters["items"] += len(items)
        self.counters["pixels"] += sum(image.shape[0] * image.shape[1] for image in images)
        self.counters["padded_pixels"] += pixel_mask.numel()
        num_phrases = max(len(it.prompt.phrase_ids) for it in items)
        inputs = dict(
            pixel_values=pixel_values.to(self.model.dtype),
            pixel_mask=pixel_mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        )
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            out = self._forward((*pixel_mask.shape, input_ids.shape[1]), inputs)
            length = input_ids.shape[1]
            scores = phrase_scores(out.logits[:, :, :length].float(), token_phrase, num_phrases, self.cfg.phrase_score)
        return scores, out.pred_boxes.float()

    def _forward(self, key: tuple, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's forward, compiled where set up; a compiler failure is noted and the detector goes eager."""
        if self.compiled is None:
            return self.model(**inputs)
        try:
            return self.compiled(key, **inputs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager model computes the same thing
            note = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); running eager"
            log.warning(note)
            self.notes.append(note)
            self.compiled = None
            return self.model(**inputs)

    def _pixels(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, zero-padded (B, 3, H, W) pixels and (B, H, W) mask, built on the device from uint8."""
        h_pad, w_pad = self._padded_shape(images[0])
        cuda = self.device.type == "cuda"
        host = torch.empty((len(images), h_pad, w_pad, 3), dtype=torch.uint8, pin_memory=cuda)
        host_view = host.numpy()  # a writable view: numpy copies from read-only arrays (PIL's) without complaint
        sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.long)
        for k, image in enumerate(images):
            h, w = image.shape[:2]
            host_view[k, :h, :w] = image
            host_view[k, h:] = 0
            host_view[k, :h, w:] = 0
        pixels = host.to(self.device, non_blocking=cuda).permute(0, 3, 1, 2).float()
        sizes = sizes.to(self.device, non_blocking=cuda)
        rows = torch.arange(h_pad, device=self.device)[None, :, None] < sizes[:, 0, None, None]
        cols = torch.arange(w_pad, device=self.device)[None, None, :] < sizes[:, 1, None, None]
        mask = (rows & cols).long()  # (B, H, W), 1 on the image, 0 on the padding
        pixels = (pixels - self.mean) / self.std * mask[:, None]  # padding is 0 after normalisation
        return pixels.contiguous(), mask

    def _padded_shape(self, image: np.ndarray) -> tuple[int, int]:
        return padded_shape(image.shape[0], image.shape[1], self.pad_multiple, self.min_canvas)

    def _text(self, items: list[_Item]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, attention mask and token-to-phrase map, assembled in pinned memory and copied without
        waiting (a blocking copy would make the host wait for the previous group's forward pass)."""
        longest = max(len(it.input_ids) for it in items)
        length = min(self.max_text_tokens, math.ceil(longest / TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE)
        if self.compiled is not None:
            length = text_bucket(longest, self.max_text_tokens)
        pad_id = self.tokenizer.pad_token_id or 0
        cuda = self.device.type == "cuda"
        host = torch.empty((3, len(items), length), dtype=torch.long, pin_memory=cuda)
        view = host.numpy()
        view[0], view[1], view[2] = pad_id, 0, -1  # ids, attention, token_phrase
        for k, it in enumerate(items):
            n = len(it.input_ids)
            view[0, k, :n] = it.input_ids
            view[1, k, :n] = 1
            view[2, k, :n] = it.token_phrase
        ids, attention, token_phrase = host.to(self.device, non_blocking=cuda).unbind(0)
        return ids, attention, token_phrase

    def _candidates(self, items: list[_Item], scores: torch.Tensor, boxes: torch.Tensor) -> list[Candidates]:
        out = []
        for k, it in enumerate(items):
            p = len(it.prompt.phrase_ids)
            out.append(
                select_candidates(
                    scores[k, :, :p].numpy(), boxes[k].numpy(), it.prompt.phrase_ids, self.cfg.box_threshold
                )
            )
        return out


def _host_candidates(item: _Item, part: Candidates | ItemCandidates) -> Candidates:
    """An item's candidates as :func:`scoring.select_candidates` gives them: query order, global phrase ids."""
    if isinstance(part, Candidates):
        return part
    order = np.argsort(part.queries, kind="stable")
    phrase_ids = np.asarray(item.prompt.phrase_ids, dtype=np.int64)
    return Candidates(part.boxes[order], phrase_ids[part.phrases[order]], part.scores[order])


def _detections(kept: Candidates, alias: dict[int, list[int]]) -> list[Detection]:
    """Detections of the kept boxes, copied to every repeat of a phrase text."""
    out = []
    for box, phrase, score in zip(kept.boxes, kept.phrases, kept.scores):
        for j in (int(phrase), *alias.get(int(phrase), [])):
            out.append(Detection(phrase=j, box=tuple(float(v) for v in box), score=float(score)))
    out.sort(key=lambda d: (d.phrase, -d.score))
    return out


def _load(name: str) -> tuple[Any, Any, tuple, tuple]:
    """Model, tokenizer and normalisation of a checkpoint, or :class:`DetectorUnavailable` in one line."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

    hint = (
        "download it where the hub is reachable and set detector.model to the local folder "
        "(--set detector.model=/path/to/grounding-dino-tiny)"
    )
    try:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        # The loader's first sentence says what went wrong (no connection, no such folder); the rest is advice
        # about hub settings that does not apply to a local folder.
        reason = " ".join(str(exc).split()).split(". ")[0].rstrip(".")[:300]
        raise DetectorUnavailable(f"cannot load detector weights {name!r} ({reason}); {hint}") from exc
    if getattr(model.config, "model_type", "") not in MODEL_TYPES:
        raise DetectorUnavailable(f"{name!r} is a {model.config.model_type!r} model, not Grounding DINO; {hint}")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        from transformers.image_processing_base import ImageProcessingMixin

        proc, _ = ImageProcessingMixin.get_image_processor_dict(name)
        mean = tuple(proc.get("image_mean") or mean)
        std = tuple(proc.get("image_std") or std)
    except (OSError, ValueError, KeyError, ImportError):
        log.info("no image processor config in %r: ImageNet normalisation", name)
    return model, tokenizer, mean, std
