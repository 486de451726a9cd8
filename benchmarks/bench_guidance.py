"""Cost of layout guidance: plain generation vs guided (early-exit UNet) vs a full-UNet reference.

The reference is the same algorithm with the recorder's early exit switched off, so each guidance
iteration runs the whole UNet as the official code does; its latents must match ours (checked).

(a) one guidance iteration in units of one plain classifier-free-guidance step (UNet on the
    batch of 2), medians of interleaved repetitions in one process; target <= 1.0;
(b) guided / plain wall time of a whole 50-step generation, worst case (threshold 0: every
    allowed iteration runs, 5 x 10, under either stopping rule) and early stop (threshold 1, met
    by the first iteration) under each stopping rule: official (that first step is the only one
    guided) and per-step (one iteration in each of the 10 guided steps);
(d) per-image layouts: a batch of 8 images, each with its own layout, against the same batch
    with one shared layout and against eight single-image calls (targets: <= 1.1x and <= 0.3x);
    the three are interleaved and repeated in one process, medians reported;
(c) peak memory: each end-to-end variant runs in a fresh subprocess that samples its resident
    set size (/proc/self/statm) every 2 ms; we report the peak above the RSS after the model
    was built (tracemalloc does not see torch's CPU allocations).
Single-threaded by default (--threads) so timings on a shared machine are stable. With
`--device cuda` every model and tensor lives on the GPU, timings synchronise the device, and (c)
reads the peak of torch's CUDA allocator instead of the resident set size: the batch bar of (d)
(<= 0.3x eight single calls) is a GPU bar, where a batch fills the device.

    python benchmarks/bench_guidance.py [--sizes tiny mid] [--steps 50] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from compinv.models import build_tiny_pipeline
from compinv.pipeline import CompositionalStableDiffusionPipeline, use_scheduler
from compinv.spatial.attention import AttentionRecorder, cross_attention_layers, recording
from compinv.spatial.guidance import Target, attention_loss, guided_pass
from compinv.spatial.options import GuidanceConfig
from compinv.versions import library_versions

RESULTS = Path(__file__).parent / "results" / "guidance.json"
PROMPT, PHRASES = "a cat and a backpack", ["cat", "backpack"]
VARIANTS = {  # name -> (guidance threshold, stop rule, full UNet per iteration); None: no layout
    "plain": None,
    "guided_worst": (0.0, "official", False),
    "guided_early_official": (1.0, "official", False),
    "guided_early_per_step": (1.0, "per-step", False),
    "reference_worst": (0.0, "official", True),
}


class ReferencePipeline(CompositionalStableDiffusionPipeline):
    """Runs the whole UNet at every guidance iteration (no early exit), as the official code."""

    def _start_session(self, *args, **kwargs):
        session = super()._start_session(*args, **kwargs)
        session.recorder.stop_after = None
        return session


def _pipeline(size: str, device: str, reference: bool = False) -> CompositionalStableDiffusionPipeline:
    cls = ReferencePipeline if reference else CompositionalStableDiffusionPipeline
    pipe = cls.from_pipe(build_tiny_pipeline(size)).to(device)
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, "lms")
    return pipe


def _sync(device: str) -> None:
    """Wait for the device's queued work, so that a timing covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(size: str, variant: str, steps: int, device: str = "cpu") -> dict:
    """One end-to-end generation in this (fresh) process: wall time and peak memory increment
    (resident set size on the CPU, torch's allocator on a GPU)."""
    setting = VARIANTS[variant]
    pipe = _pipeline(size, device, reference=bool(setting and setting[2]))
    kwargs = {}
    if setting is not None:
        guidance = GuidanceConfig(loss_threshold=setting[0], stop_rule=setting[1])
        kwargs = dict(layout="auto", phrases=PHRASES, guidance=guidance)
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    gpu = device.startswith("cuda")
    if gpu:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="np", **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if gpu:
        peak[0] = torch.cuda.max_memory_allocated(device)
    losses = getattr(out, "guidance_losses", None)
    return {"seconds": seconds, "stop_rule": setting[1] if setting else None,
            "peak_rss_increase_mb": max(peak[0] - baseline, 0) / 2**20,
            "guidance_iterations": sum(map(len, losses)) if losses else 0,
            "losses": [v for step in losses or [] for v in step]}


def _median_ms(fn, reps: int, device: str) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def iteration_costs(size: str, reps: int, device: str = "cpu") -> dict:
    """(a): median ms of one CFG step, one guidance iteration, one full-UNet iteration."""
    pipe = _pipeline(size, device)
    unet, side = pipe.unet, pipe.unet.config.sample_size
    with torch.no_grad():
        cond = pipe.encode_prompt(PROMPT, device, 1, False)[0]
    latents = torch.randn(1, 4, side, side).to(device)
    targets = [Target("cat", (2,), ((0.1, 0.2, 0.5, 0.8),)),
               Target("backpack", (5,), ((0.6, 0.2, 0.95, 0.8),))]
    recorder = AttentionRecorder(cross_attention_layers(unet, None))
    t = torch.tensor(981, device=device)

    def cfg_step():
        with torch.no_grad():
            unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([cond] * 2))

    def iteration(stop_after):
        def run():
            recorder.stop_after = stop_after
            z = latents.clone().requires_grad_(True)
            loss = attention_loss(guided_pass(unet, recorder, z, t, cond, None), targets, (side, side))
            torch.autograd.grad(loss.sum(), z)
        return run

    with recording(unet, recorder):
        ms = {"cfg_step": [], "guidance_iteration": [], "reference_iteration": []}
        for _ in range(reps):  # interleaved, so load drifts hit all three alike
            ms["cfg_step"].append(_median_ms(cfg_step, 1, device))
            ms["guidance_iteration"].append(_median_ms(iteration(recorder.layers[-1]), 1, device))
            ms["reference_iteration"].append(_median_ms(iteration(None), 1, device))
    return {k: statistics.median(v) for k, v in ms.items()}


def _batch_layouts(n: int) -> list[dict]:
    """n different two-box layouts (the cat left or right, at varying heights and widths)."""
    layouts = []
    for i in range(n):
        shift, top = 0.05 * (i % 4), 0.1 * (i // 4)
        left, right = (0.05 + shift, top, 0.45 + shift, top + 0.6), (0.55, 0.3 - top, 0.95, 0.9 - top)
        layouts.append({"cat": left, "backpack": right} if i % 2 == 0
                       else {"cat": right, "backpack": left})
    return layouts


def batch_costs(size: str, steps: int, reps: int, images: int = 8, device: str = "cpu") -> dict:
    """(d): seconds of one batched call with per-image layouts, with one shared layout, and of
    `images` single-image calls; worst-case guidance (every allowed iteration runs)."""
    pipe = _pipeline(size, device)
    layouts = _batch_layouts(images)
    guidance = GuidanceConfig(loss_threshold=0.0)
    common = dict(num_inference_steps=steps, output_type="np", guidance=guidance)

    def seeds(k: int = images, start: int = 0):
        return [torch.Generator().manual_seed(start + i) for i in range(k)]

    variants = {
        "per_image_layouts": lambda: pipe([PROMPT] * images, layout=layouts, generator=seeds(), **common),
        "shared_layout": lambda: pipe([PROMPT] * images, layout=layouts[0], generator=seeds(), **common),
        "single_calls": lambda: [pipe(PROMPT, layout=layouts[i], generator=seeds(1, i)[0], **common)
                                 for i in range(images)],
    }
    seconds = {k: [] for k in variants}
    for _ in range(reps):  # interleaved, so load drifts hit all three alike
        for name, run in variants.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"images": images, "steps": steps, "reps": reps, "seconds": median, "all_seconds": seconds,
            "per_image_over_shared": median["per_image_layouts"] / median["shared_layout"],
            "per_image_over_single_calls": median["per_image_layouts"] / median["single_calls"]}


def bench_size(size: str, steps: int, reps: int, threads: int, batch_steps: int, batch_reps: int,
               device: str = "cpu") -> dict:
    costs = iteration_costs(size, reps, device)
    batches = batch_costs(size, batch_steps, batch_reps, device=device)
    runs = {}
    for variant in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, "--child", size, variant, str(steps), "--threads", str(threads),
             "--device", device], capture_output=True, text=True, check=True)
        runs[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    plain = runs["plain"]
    return {
        "size": size, "steps": steps, "ms": costs, "batch": batches,
        "iteration_in_cfg_steps": costs["guidance_iteration"] / costs["cfg_step"],
        "reference_iteration_in_cfg_steps": costs["reference_iteration"] / costs["cfg_step"],
        "runs": runs,
        "time_ratio": {v: runs[v]["seconds"] / plain["seconds"] for v in runs},
        "memory_ratio": {v: (runs[v]["peak_rss_increase_mb"] / plain["peak_rss_increase_mb"]
                             if plain["peak_rss_increase_mb"] else None) for v in runs},
        "reference_max_loss_difference": max(
            abs(a - b) for a, b in zip(runs["reference_worst"]["losses"], runs["guided_worst"]["losses"])),
    }


def _table(results: list[dict]) -> str:
    rows = ["| model | variant | stop rule | guidance iterations | seconds | x plain time | peak RSS +MB "
            "| x plain memory |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for v, run in r["runs"].items():
            mem = r["memory_ratio"][v]
            rows.append(f"| {r['size']} | {v} | {run['stop_rule'] or '-'} | {run['guidance_iterations']} | "
                        f"{run['seconds']:.2f} | {r['time_ratio'][v]:.2f} | {run['peak_rss_increase_mb']:.0f} | "
                        + (f"{mem:.2f} |" if mem is not None else "n/a |"))
    rows.append("")
    rows.append("| model | CFG step ms | guidance iteration ms (x CFG step) | full-UNet iteration ms (x CFG step) |")
    rows.append("|---|---|---|---|")
    for r in results:
        ms = r["ms"]
        rows.append(f"| {r['size']} | {ms['cfg_step']:.1f} | {ms['guidance_iteration']:.1f} "
                    f"({r['iteration_in_cfg_steps']:.2f}) | {ms['reference_iteration']:.1f} "
                    f"({r['reference_iteration_in_cfg_steps']:.2f}) |")
    rows.append("")
    rows.append("| model | images x steps | per-image layouts s | shared layout s | 8 single calls s "
                "| per-image / shared | per-image / single calls |")
    rows.append("|---|---|---|---|---|---|---|")
    for r in results:
        b = r["batch"]
        rows.append(f"| {r['size']} | {b['images']} x {b['steps']} | {b['seconds']['per_image_layouts']:.2f} "
                    f"| {b['seconds']['shared_layout']:.2f} | {b['seconds']['single_calls']:.2f} "
                    f"| {b['per_image_over_shared']:.2f} | {b['per_image_over_single_calls']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=7, help="repetitions of each iteration timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-steps", type=int, default=12,
                        help="denoising steps of the per-image-layout runs (the first 10 guided)")
    parser.add_argument("--batch-reps", type=int, default=3, help="repetitions of the batch runs")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the GPU bars")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON to write (default: benchmarks/results/guidance.json, or guidance_cuda.json)")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; run on a GPU machine or use --device cpu")
    if args.child:
        size, variant, steps = args.child
        print(json.dumps(run_variant(size, variant, int(steps), args.device)))
        return
    results = [bench_size(s, args.steps, args.reps, args.threads, args.batch_steps, args.batch_reps, args.device)
               for s in args.sizes]
    print(_table(results))
    out = args.results or (RESULTS if args.device == "cpu" else RESULTS.with_name("guidance_cuda.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    out.write_text(json.dumps({"threads": args.threads, "device": device_name, "results": results,
                               "versions": library_versions()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
