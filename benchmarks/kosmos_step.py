"""Training-step throughput of our Kosmos-2 against HF's ``Kosmos2ForConditionalGeneration``, side by side.

Both models get the same config (HF's is written from ours by ``kosmos.model.hf``), batch, sequence, inputs
(pixel_values, input_ids, image_embeds_position_mask, an all-ones attention_mask as a padded trainer passes, labels
with -100 up to ``</image>``) and the same step: forward with labels, backward, fused AdamW (paper betas and eps).
Dropout stays at the config's 0.1 for both. Ours is called as a trainer calls it, with ``return_logits=False``
(the LM head runs only at positions with a target; HF has no such switch); the loss is the same.

- CPU: a small config in fp32 on one thread; both models resident, timed steps alternate so machine noise hits
  both alike.
- CUDA: ``kosmos2-1.6b`` under bf16 autocast with fp32 master weights; one model at a time, each freed before the
  next is built; ours eager, then the same model with its blocks compiled (compile time reported).
  ``KOSMOS_STEP_SMOKE=1`` runs this path on a tiny config on whatever device exists, to check the script end to end.
  ``KOSMOS_STEP_BATCH``, ``KOSMOS_STEP_SEQ``, ``KOSMOS_STEP_STEPS``, ``KOSMOS_STEP_COMPILE=0|1`` override it.

Tokens/s counts text tokens (batch x sequence). MFU = model FLOPs per step / step time / the GPU's dense bf16 peak;
FLOPs = 6 x (matmul parameters x the tokens each sees) for vision, connector, decoder and LM head, plus the PaLM
attention term 12 x layers x width x context per token (causal attention counted in full, as PaLM does).
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import nullcontext

import torch

from benchmarks.common import repeat_timed, summary
from kosmos.model.hf import our_config_to_hf
from kosmos.model.model import KosmosConfig, TextConfig, VisionConfig
from kosmos.model.parallelize import ParallelConfig, parallelize
from kosmos.model.registry import model_config

TARGET_RATIO = 1.3
TARGET_MFU = 0.40

# GPU name substring -> dense bf16 peak FLOP/s (first match wins).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))


def cpu_config() -> KosmosConfig:
    """Small enough for the CPU run to finish in a minute or two, with every component present."""
    return KosmosConfig(
        vision=VisionConfig(image_size=112, patch_size=16, width=192, layers=4, heads=3, mlp_dim=768),
        text=TextConfig(vocab_size=8192, max_positions=512, dim=256, layers=4, heads=4, ffn_dim=1024),
        latent_query_num=16,
        loc_token_start=8192 - 1024,
    )


def train_flops(cfg: KosmosConfig, batch: int, seq: int, lm_positions: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward) at this batch and text length.

    Each term is (matmul parameters x tokens through them) or, for attention, 2 x width x context x queries per
    layer, so that 6x the sum is 6N per token plus PaLM's 12 x layers x width x context per query. The LM head
    counts ``lm_positions`` positions per row (those with a target, where the training step computes it; default
    all ``seq``).
    """
    lm = seq if lm_positions is None else lm_positions
    v, t = cfg.vision, cfg.text
    n_img, q = cfg.num_image_tokens, cfg.latent_query_num
    vision = v.layers * (4 * v.width**2 + 2 * v.width * v.mlp_dim) * n_img
    vision += v.num_channels * v.patch_size**2 * v.width * (n_img - 1)  # patch embedding
    vision += 2 * v.layers * v.width * n_img * n_img
    connector = v.width * t.dim * n_img + 2 * t.dim**2 * (n_img + q) + 2 * t.dim**2 * q  # dense, kv, q + out
    connector += 2 * t.dim * (n_img + q) * q
    decoder = t.layers * (4 * t.dim**2 + 2 * t.dim * t.ffn_dim) * seq + t.vocab_size * t.dim * lm  # blocks, head
    decoder += 2 * t.layers * t.dim * seq * seq
    return 6.0 * (vision + connector + decoder) * batch


def make_batch(cfg: KosmosConfig, batch: int, seq: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, t = cfg.latent_query_num, cfg.text
    if seq < q + 4:
        raise ValueError(f"sequence {seq} too short for {q} image slots")
    ids = torch.randint(3, t.vocab_size, (batch, seq), generator=g)
    ids[:, 0] = t.bos_token_id
    image_mask = torch.zeros(batch, seq, dtype=torch.long)
    image_mask[:, 2 : 2 + q] = 1
    labels = ids.masked_fill(torch.arange(seq) <= 2 + q, -100)
    pixels = torch.randn(batch, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    out = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=image_mask, labels=labels)
    out["attention_mask"] = torch.ones_like(ids)
    return {k: v.to(device) for k, v in out.items()}


def build_hf(cfg: KosmosConfig, device: str):
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    def strip(d: dict) -> dict:  # keys that name the class, not the model
        return {
            k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("model_type", "architectures")
        }

    hf_cfg = Kosmos2Config(**strip(our_config_to_hf(cfg)))
    try:  # initialise directly on the device: seconds instead of minutes for 1.6B parameters
        with torch.device(device):
            model = Kosmos2ForConditionalGeneration(hf_cfg)
    except Exception:  # noqa: BLE001 - a release that cannot build under a device context builds on CPU
        model = Kosmos2ForConditionalGeneration(hf_cfg).to(device)
    return model.train()


def build_ours(cfg: KosmosConfig, device: str):
    from kosmos.model.model import KosmosModel

    with torch.device(device):
        model = KosmosModel(cfg)
    return model.train()


class Trainer:
    """One model, its fused AdamW and the training step, timed the same way for every model.

    One step is what the trainer does for one update: ``len(micro_batches)`` forward/backward passes (gradient
    accumulation, each loss divided by the number of micro-batches), then one optimizer step.
    """

    def __init__(
        self, model, micro_batches: list[dict], device: str, autocast_dtype: torch.dtype | None, loss_fn=None, **kw
    ):
        self.model, self.micro_batches, self.device = model, micro_batches, device
        self.loss_fn = loss_fn or (lambda batch: model(**batch, **kw).loss)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = torch.device(device).type == "cuda" or not _is_dtensor(params[0])
        self.opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=fused)
        device_type = torch.device(device).type
        self.autocast = (lambda: torch.autocast(device_type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
        self.sync = torch.cuda.synchronize if device_type == "cuda" else None

    def step(self) -> None:
        n = len(self.micro_batches)
        for i, batch in enumerate(self.micro_batches):
            sync = getattr(self.model, "set_requires_gradient_sync", None)
            if sync is not None:  # FSDP: reduce-scatter on the last micro-batch only, as the trainer does
                sync(i == n - 1)
            with self.autocast():
                loss = self.loss_fn(batch)
            (loss / n).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def warmup(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.sync:
            self.sync()
        return time.perf_counter() - t0

    def time(self, steps: int) -> list[float]:
        return repeat_timed(self.step, repeats=steps, warmup=0, sync=self.sync)


def _is_dtensor(p) -> bool:
    return hasattr(p, "full_tensor")


def host_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat positions whose next token is a target, as the trainer computes them on the host."""
    labels = batch["labels"].cpu()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    return shifted.ne(-100).nonzero().squeeze(1)


def ours_inputs(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Our model's training inputs: no attention mask (rows are full), the target positions from the host."""
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["target_index"] = host_targets(batch).to(device)
    return out


def ours_loss(model):
    """The whole training forward + loss, as one function to compile: no host syncs inside."""

    def loss_fn(batch):
        return model(**batch, reduction="mean", return_logits=False, images_in_slot_order=True, check_slots=False).loss

    return loss_fn


def _report(times: list[float], tokens: int, flops: float, peak: float | None, **extra) -> dict:
    s = summary(times)
    out = {"step_s": s, "tokens_per_s": round(tokens / s["median_s"], 1), **extra}
    out["achieved_tflops"] = round(flops / s["median_s"] / 1e12, 3)
    if peak:
        out["mfu"] = round(flops / s["median_s"] / peak, 4)
    return out


def run_cpu() -> dict:
    # One thread: on a shared two-core machine, two threads per process make every timing hostage to other load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_cpu()
    finally:
        torch.set_num_threads(threads)


def _run_cpu() -> dict:
    torch.manual_seed(0)
    cfg, batch_size, seq, rounds, per_round = cpu_config(), 8, 192, 16, 1
    batch = make_batch(cfg, batch_size, seq, "cpu")
    ours = build_ours(cfg, "cpu")
    trainers = {
        "hf": Trainer(build_hf(cfg, "cpu"), [batch], "cpu", None),
        "ours": Trainer(ours, [ours_inputs(batch, "cpu")], "cpu", None, loss_fn=ours_loss(ours)),
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for tr in trainers.values():
        tr.warmup(2)
    for _ in range(rounds):  # alternate, so drift in machine load hits both
        for name, tr in trainers.items():
            times[name] += tr.time(per_round)
    flops = train_flops(cfg, batch_size, seq, lm_positions=target_positions(cfg, seq))
    tokens = batch_size * seq
    result = {
        "setting": {
            "config": cfg.to_dict(),
            "batch": batch_size,
            "seq": seq,
            "dtype": "float32",
            "optimizer": "AdamW fused",
            "torch_threads": torch.get_num_threads(),
        },
        "flops_per_step": flops,
        "hf": _report(
            times["hf"], tokens, flops, None, params=sum(p.numel() for p in trainers["hf"].model.parameters())
        ),
        "ours": _report(times["ours"], tokens, flops, None, params=trainers["ours"].model.num_parameters()),
    }
    result["ratio"] = round(result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 3)
    # Best step against best step: the figure least disturbed by other load on a shared machine.
    result["ratio_min_step"] = round(result["hf"]["step_s"]["min_s"] / result["ours"]["step_s"]["min_s"], 3)
    return {**headline("cpu", result["ours"], result["ratio"]), **result}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def target_positions(cfg: KosmosConfig, seq: int) -> int:
    """Positions per :func:`make_batch` row whose next token is a target (where our LM head runs)."""
    # Labels start after </image> (position 2 + Q), so positions 2 + Q .. seq - 2 predict one: seq - Q - 3 of them.
    return seq - cfg.latent_query_num - 3


def headline(device: str, best: dict, speedup: float | None) -> dict:
    """The top-level figures: the best of our step variants, and its speed against HF's."""
    import datetime as _dt

    return {
        "device": device,
        "tokens_per_s": best.get("tokens_per_s"),
        "mfu": best.get("mfu"),
        "speedup_vs_hf": speedup,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _single_rank_group(device: str) -> bool:
    """A one-rank process group, so that FSDP2 (bf16 compute weights over fp32 masters) runs on one device."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


VARIANTS = ("hf", "ours_eager", "ours_compiled", "ours_fsdp_bf16")


def run_gpu_path() -> dict:
    """HF, then ours three ways, each with the same micro-batches and gradient accumulation:

    - ``ours_eager``: bf16 autocast over fp32 weights, eager;
    - ``ours_compiled``: the same, with the whole forward + loss compiled as one graph (no host syncs in it);
    - ``ours_fsdp_bf16``: FSDP2 on one rank with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
      (bf16 compute weights gathered once per block, fp32 master weights, gradients and optimizer), the whole
      forward + loss compiled, selective activation checkpointing (``KOSMOS_STEP_AC``: selective | full | none).
    """
    smoke = os.environ.get("KOSMOS_STEP_SMOKE") == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not smoke and device != "cuda":
        raise RuntimeError("no CUDA device (KOSMOS_STEP_SMOKE=1 runs this path on a tiny config on CPU)")
    size = "tiny" if smoke else "kosmos2-1.6b"
    batch_size = _env_int("KOSMOS_STEP_BATCH", 2 if smoke else 16)
    seq = _env_int("KOSMOS_STEP_SEQ", 64 if smoke else 512)
    accum = _env_int("KOSMOS_STEP_ACCUM", 2)
    steps = _env_int("KOSMOS_STEP_STEPS", 2 if smoke else 6)
    use_compile = os.environ.get("KOSMOS_STEP_COMPILE", "1") == "1"
    ac = os.environ.get("KOSMOS_STEP_AC", "selective")
    variants = [v for v in os.environ.get("KOSMOS_STEP_VARIANTS", ",".join(VARIANTS)).split(",") if v]
    if not use_compile:
        variants = [v for v in variants if v != "ours_compiled"]
    cfg = model_config(size)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = next((p for key, p in PEAK_BF16 if key in name), None)
    flops = train_flops(cfg, batch_size, seq, lm_positions=target_positions(cfg, seq)) * accum
    tokens = batch_size * seq * accum
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict = {
        "setting": {
            "size": size, "smoke": smoke, "device": name, "batch": batch_size, "seq": seq, "grad_accum": accum,
            "tokens_per_step": tokens, "steps": steps, "activation_checkpointing": ac,
            "precision": "bf16 compute, fp32 master weights", "optimizer": "AdamW fused, one step per accumulation",
            "dropout": cfg.text.dropout,
            "mfu_counts": "model FLOPs with the LM head at target positions only (where the step computes it)",
        },
        "flops_per_step": flops,
        "peak_bf16_flops": peak,
    }  # fmt: skip
    micro = [make_batch(cfg, batch_size, seq, device, seed=i) for i in range(accum)]
    warm_steps = 1 if smoke else 2
    # gpu.sh stops a benchmark that runs past its budget, losing its JSON: stop starting variants before that.
    budget_s, started = float(os.environ.get("KOSMOS_STEP_BUDGET_S", 230)), time.perf_counter()

    def measure(key: str, build, **extra) -> None:
        if time.perf_counter() - started > budget_s:
            result[key] = {"skipped": f"time budget of {budget_s:.0f} s spent (KOSMOS_STEP_BUDGET_S)"}
            return
        torch.manual_seed(0)
        _reset_peak(device)
        tr = None
        try:
            t0 = time.perf_counter()
            tr = build()
            build_s = time.perf_counter() - t0
            warm = tr.warmup(warm_steps)  # compiles, for the compiled variants
            times = tr.time(steps)
            result[key] = _report(
                times, tokens, flops, peak, build_s=round(build_s, 2), warmup_s=round(warm, 2),
                peak_mem_gib=_peak_gib(device), **extra,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others' figures
            result[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        finally:
            del tr
            _free()

    if "hf" in variants:

        def build_hf_trainer():
            hf = build_hf(cfg, device)
            return Trainer(hf, micro, device, torch.bfloat16)

        measure("hf", build_hf_trainer)
    ours_micro = [ours_inputs(b, device) for b in micro]
    if "ours_eager" in variants:

        def build_eager():
            model = build_ours(cfg, device)
            return Trainer(model, ours_micro, device, torch.bfloat16, loss_fn=ours_loss(model))

        measure("ours_eager", build_eager)
    if "ours_compiled" in variants:

        def build_compiled():
            model = build_ours(cfg, device)
            return Trainer(model, ours_micro, device, torch.bfloat16, loss_fn=torch.compile(ours_loss(model)))

        measure("ours_compiled", build_compiled, compiled="whole forward + loss")
    owns_group = False
    if "ours_fsdp_bf16" in variants:
        owns_group = _single_rank_group(device)

        def build_fsdp():
            model = build_ours(cfg, device)
            parallel = ParallelConfig(
                data_parallel="fsdp", fsdp_param_dtype="bfloat16", activation_checkpointing=ac != "none",
                checkpoint_policy="selective" if ac == "selective" else "full",
            )  # fmt: skip
            parallelize(model, parallel, device)
            loss_fn = ours_loss(model)
            return Trainer(model, ours_micro, device, None, loss_fn=torch.compile(loss_fn) if use_compile else loss_fn)

        measure("ours_fsdp_bf16", build_fsdp, compiled="whole forward + loss" if use_compile else "no")
    if owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()

    ours_keys = ("ours_eager", "ours_compiled", "ours_fsdp_bf16")
    ours = [result[k] for k in ours_keys if "tokens_per_s" in result.get(k, {})]
    best = max(ours, key=lambda r: r["tokens_per_s"]) if ours else {}
    hf_tps = result.get("hf", {}).get("tokens_per_s")
    for key in ours_keys:
        if hf_tps and "tokens_per_s" in result.get(key, {}):
            result[f"ratio_{key.removeprefix('ours_')}"] = round(result[key]["tokens_per_s"] / hf_tps, 3)
    speedup = round(best["tokens_per_s"] / hf_tps, 3) if best and hf_tps else None
    result["ratio"] = speedup
    result["best"] = next((k for k in ours_keys if result.get(k) is best), None)
    result["target_ratio"] = TARGET_RATIO
    result["target_mfu"] = TARGET_MFU
    result["meets_target"] = bool(speedup and speedup >= TARGET_RATIO)
    result["meets_mfu_target"] = bool(best.get("mfu") and best["mfu"] >= TARGET_MFU)
    return {**headline(name, best, speedup), **result}


def run(device: str) -> dict:
    if device == "cpu":
        return run_cpu()
    if device == "cuda":
        return run_gpu_path()
    raise ValueError(f"unknown device {device!r}")
