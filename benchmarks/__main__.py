"""``python -m benchmarks run [--only NAME[,NAME]] [--device cpu|cuda] [--out DIR]``.

Each benchmark module defines ``run(device: str) -> dict``; the result, with machine facts, goes to
``<out>/<name>_<device>.json``. Modules are imported only when run, so the CUDA half needs no Ray or spaCy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from benchmarks.common import RESULTS_DIR, machine_info, write_result

# name -> (module, devices it runs on)
BENCHMARKS = {
    "text_stage": ("benchmarks.text_stage", ("cpu",)),
    "grounding": ("benchmarks.grounding", ("cpu", "cuda")),
    "pipeline": ("benchmarks.pipeline", ("cpu",)),
    "driver": ("benchmarks.driver", ("cpu",)),
    "stats": ("benchmarks.stats_report", ("cpu",)),
    "kosmos_step": ("benchmarks.kosmos_step", ("cpu", "cuda")),
    "loader": ("benchmarks.loader", ("cpu", "cuda")),
    "trainer_gpu": ("benchmarks.trainer_gpu", ("cuda",)),
    "image_decode_memory": ("benchmarks.image_decode_memory", ("cpu",)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run benchmarks and write JSON results")
    run_p.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHMARKS))
    run_p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    run_p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON files (default %(default)s)")
    sub.add_parser("list", help="list the benchmarks")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, (module, devices) in BENCHMARKS.items():
            print(f"{name:<14}{module:<32}{','.join(devices)}")
        return 0
    names = [n for n in args.only.split(",") if n] or [n for n, (_, d) in BENCHMARKS.items() if args.device in d]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}")
    failed = []
    for name in names:
        module_name, devices = BENCHMARKS[name]
        if args.device not in devices:
            print(f"[{name}] skipped: no {args.device} variant")
            continue
        print(f"[{name}] running on {args.device} ...", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            payload = module.run(args.device)
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        result = {"benchmark": name, "machine": machine_info(args.device), **payload}
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        path = write_result(f"{name}_{args.device}", result, args.out)
        print(f"[{name}] done in {result['wall_s']} s -> {path}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
