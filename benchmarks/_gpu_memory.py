"""bench_gpu's memory section: sub-linear memory (activation checkpointing) off and on, per image count.

One model at a time, so that each peak (torch.cuda.max_memory_allocated over the timed steps, the
model included) is that configuration's alone.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from _gpu_rows import Scale, build_row, make_batches, sync


def memory_section(args, scale: Scale, device: torch.device, ctx) -> list[dict]:
    """hvd_local with sub-linear memory off and on, one model at a time, at each image count."""
    out = []
    counts = [int(n) for n in args.memory_images.split(",") if n]
    for images in counts:
        batches = make_batches(scale, images, count=2, seed=images)
        pair = {}
        for sublinear in (False, True):
            row = build_row("hvd_local", args.memory_amp, scale, device, ctx, sublinear=sublinear)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for i in range(args.warmup):
                row.step(batches[i % 2])
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # the peak over the timed steps, model included
            for i in range(max(args.steps // 3, 2)):
                start = time.perf_counter()
                row.step(batches[i % 2])
                sync(device)
                row.times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            pair[sublinear] = {"images_per_gpu": images, "sublinear_memory": sublinear, "amp": args.memory_amp,
                               "step_time_s": statistics.median(row.times), "peak_mem_mb": peak}
            del row
        for sublinear in (False, True):
            r = pair[sublinear]
            r["peak_vs_off"] = None if r["peak_mem_mb"] is None else r["peak_mem_mb"] / pair[False]["peak_mem_mb"]
            r["step_vs_off"] = r["step_time_s"] / pair[False]["step_time_s"]
            out.append(r)
        print(f"  memory: {images} images done", file=sys.stderr, flush=True)
    return out

