"""Peak memory of one image decode at the pixel limit (``image.max_pixels``), 16-bit input.

A 16-bit greyscale PNG of a smooth gradient just under the default limit (89,478,485 pixels) compresses to a few
hundred KB, yet decodes to 171 MiB of 16-bit pixels: the case where a float64 conversion used to cost 2.3 GB. Each
case runs ``process_image`` once in a fresh subprocess and reports the growth of its peak RSS (``VmHWM`` from
``/proc/self/status``) over the peak just before the call (input bytes already in memory), plus tracemalloc's peak
(numpy's temporaries; Pillow's own pixel buffers are not traced).
``python -m benchmarks.image_decode_memory [--module FILE]`` measures another version of ``grit_pipeline/image.py``
(for a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
LIMIT = 89_478_485

CHILD = r"""
import importlib.util, json, sys, time, tracemalloc

def hwm_kib():
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak across fork+exec on Linux).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

sys.path.insert(0, sys.argv[3])
from grit_pipeline.config import ImageConfig
if sys.argv[2]:
    spec = importlib.util.spec_from_file_location("image_under_test", sys.argv[2])
    module = sys.modules["image_under_test"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    process_image = module.process_image
else:
    from grit_pipeline.image import process_image
data = open(sys.argv[1], "rb").read()
want_rgb = sys.argv[4] == "rgb"
before = hwm_kib()
tracemalloc.start()
t0 = time.perf_counter()
r = process_image(data, ImageConfig(decode_timeout_s=0), (800, 1333), want_rgb=want_rgb)
seconds = time.perf_counter() - t0
_, traced = tracemalloc.get_traced_memory()
peak = hwm_kib()
print(json.dumps({"drop_reason": r.drop_reason, "detail": r.detail[:200], "seconds": round(seconds, 2),
                  "rss_before_mib": round(before / 1024, 1), "peak_rss_growth_mib": round((peak - before) / 1024, 1),
                  "tracemalloc_peak_mib": round(traced / 2**20, 1)}))
"""


def make_png16(path: Path, side: int) -> int:
    import numpy as np
    from PIL import Image

    y = np.arange(side, dtype=np.uint32)
    row = (y * 65535 // max(1, side - 1)).astype(np.uint16)
    arr = np.broadcast_to(row, (side, side))  # (H, W) uint16 gradient, no copy until Pillow takes it
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG", compress_level=6)
    return path.stat().st_size


def measure(path: Path, module: str = "", want_rgb: bool = True) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), module, str(REPO), "rgb" if want_rgb else "norgb"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(device: str = "cpu", module: str = "") -> dict:
    side = math.isqrt(LIMIT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "png16.png"
        size = make_png16(path, side)
        cases = {
            "png16_at_limit_detector_rgb": measure(path, module, want_rgb=True),
            "png16_at_limit_validate_only": measure(path, module, want_rgb=False),
        }
    pixels = side * side
    return {
        "image": {"width": side, "height": side, "pixels": pixels, "mode": "I;16", "encoded_bytes": size},
        "pixel_limit": LIMIT,
        "decoded_16bit_mib": round(pixels * 2 / 2**20, 1),
        "rgb8_mib": round(pixels * 3 / 2**20, 1),
        "module": module or "grit_pipeline/image.py",
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="", help="another image.py to measure (default: the package's)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    result = run("cpu", args.module)
    result["machine"] = machine_info("cpu")
    name = "image_decode_memory" + ("_other" if args.module else "") + "_cpu"
    print(json.dumps(result, indent=2))
    write_result(name, result, args.out)


if __name__ == "__main__":
    main()
