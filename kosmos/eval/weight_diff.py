"""Which weights did training change? A per-module summary of the difference between two checkpoints, and
``kosmos diff-checkpoints A B``.

Fine-tuning reports often come down to "the loss moved but did the part I meant to train change, and did the frozen
part stay put?". This answers it from the files alone: for each module (parameter names cut to ``--depth``
components), how many values changed, the relative change ``||B - A|| / ||A||`` and the largest absolute change.
``--expect-frozen PREFIX`` and ``--expect-trained PREFIX`` turn the summary into a check (exit status 1 when a frozen
module changed or a trained one did not). The trainer writes the same summary as ``weight_change.json`` at the end
of a run, against the weights it started from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SUMMARY_DEPTH = 3  # the trainer's summary: per block and sub-module ("blocks.3.attn", "vision.blocks.23")


def module_of(name: str, depth: int) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.3`` at depth 2; ``embed_tokens.weight`` -> ``embed_tokens``;
    ``connector.latent_query`` stays whole."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts[: max(1, depth)])


def diff_state_dicts(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], depth: int = 2
) -> list[dict[str, Any]]:
    """One row per module: ``module``, ``tensors``, ``params``, ``changed`` (values that differ), ``rel_change``,
    ``max_abs_change``. Names present in only one side raise ValueError (different models)."""
    if set(before) != set(after):
        only = sorted(set(before) ^ set(after))
        raise ValueError(f"the checkpoints hold different parameters, e.g. {only[:3]}")
    rows: dict[str, dict[str, Any]] = {}
    sq_diff: dict[str, float] = {}
    sq_before: dict[str, float] = {}
    for name in sorted(before):
        a, b = before[name].float(), after[name].float()
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        key = module_of(name, depth)
        row = rows.setdefault(key, {"module": key, "tensors": 0, "params": 0, "changed": 0, "max_abs_change": 0.0})
        delta = b - a
        row["tensors"] += 1
        row["params"] += a.numel()
        row["changed"] += int(delta.ne(0).sum())
        row["max_abs_change"] = max(row["max_abs_change"], float(delta.abs().max()) if a.numel() else 0.0)
        sq_diff[key] = sq_diff.get(key, 0.0) + float(delta.double().pow(2).sum())
        sq_before[key] = sq_before.get(key, 0.0) + float(a.double().pow(2).sum())
    for key, row in rows.items():
        row["rel_change"] = (sq_diff[key] ** 0.5) / max(sq_before[key] ** 0.5, 1e-30)
    return list(rows.values())


def check_expectations(
    rows: list[dict[str, Any]], frozen: Sequence[str] = (), trained: Sequence[str] = ()
) -> list[str]:
    """Problems: a module under a ``frozen`` prefix with a changed value; a ``trained`` prefix none of whose
    values changed."""
    problems = []
    for prefix in frozen:
        changed = [r["module"] for r in rows if _under(r["module"], prefix) and r["changed"]]
        if changed:
            problems.append(f"expected frozen, but changed: {', '.join(changed)}")
    for prefix in trained:
        mine = [r for r in rows if _under(r["module"], prefix)]
        if not mine:
            problems.append(f"no parameter under {prefix!r}")
        elif not any(r["changed"] for r in mine):
            problems.append(f"expected trained, but unchanged: {prefix}")
    return problems


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix.rstrip(".") + ".") or prefix == ""


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len("module")] + [len(r["module"]) for r in rows])
    lines = [f"{'module':<{width}}  {'params':>11}  {'changed':>8}  {'rel change':>10}  {'max |change|':>12}"]
    for r in rows:
        share = r["changed"] / max(r["params"], 1)
        lines.append(
            f"{r['module']:<{width}}  {r['params']:>11,}  {share:>8.1%}  {r['rel_change']:>10.3g}  "
            f"{r['max_abs_change']:>12.3g}"
        )
    return "\n".join(lines)


def write_summary(before_dir: str | Path, after_dir: str | Path, out: str | Path, frozen: Sequence[str]) -> dict:
    """The trainer's end-of-run summary: ``weight_change.json`` in ``out``, with the frozen prefixes checked and
    every other module expected to have changed."""
    from kosmos.model.checkpoint import load_state_dict

    rows = diff_state_dicts(load_state_dict(before_dir), load_state_dict(after_dir), depth=SUMMARY_DEPTH)
    trained = sorted({r["module"] for r in rows if not any(_under(r["module"], f) for f in frozen)})
    payload = {
        "before": str(before_dir),
        "after": str(after_dir),
        "frozen": list(frozen),
        "modules": rows,
        "problems": check_expectations(rows, frozen, trained),
    }
    Path(out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return payload
