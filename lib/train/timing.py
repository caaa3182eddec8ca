"""Timing and profiling callbacks that real training runs use (`make train`, and so `make bench`).

StepTimer gives metrics.json its steady samples/s (warm-up, evaluation and saves left out), and
beside it clips/s, label tokens/s and audio-hours per GPU-hour from what the batches held (a
packed window is one sample of several clips, so samples/s alone says little);
ProfileSteps writes RUN/profile.txt (where the GPU time goes) for train.profile_steps.
Random-weight models and FLOP arithmetic are the bench's, in lib/tools/models.py.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Steady-state training speed: skips the first `warmup` optimizer steps (allocation,
    autotuning, compilation), then sums step-to-step times with the GPU synchronized at each
    step end. Time spent in evaluation and checkpoint saves is left out."""

    def __init__(self, warmup: int = 3, until: int | None = None, counted: dict[str, float] | None = None):
        self.warmup = warmup
        self.until = until
        """last step timed (the profiled steps after it are slower and left out)"""
        self.last: float | None = None
        self.steps = 0
        self.seconds = 0.0
        self.counted = counted if counted is not None else {}
        """the Trainer's running totals of what its batches held (lib.train.collator.COUNT_KEYS)"""
        self.seen: dict[str, float] = {}
        """those totals at the last step end"""
        self.timed: dict[str, float] = {}
        """what the timed steps held, this process's batches"""

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.until is not None and state.global_step > self.until:
            return
        now = self._now()
        if state.global_step > self.warmup and self.last is not None:
            self.steps += 1
            self.seconds += now - self.last
            for k, v in self.counted.items():
                self.timed[k] = self.timed.get(k, 0) + v - self.seen.get(k, 0)
        self.seen = dict(self.counted)
        self.last = now if state.global_step >= self.warmup else None

    def _restart(self, args, state, control, **kwargs):
        if self.last is not None:
            self.last = self._now()

    on_evaluate = _restart
    on_save = _restart

    def summary(self, samples_per_step: int, processes: int = 1) -> dict[str, float | int | None]:
        """Steady rates of all processes: samples (a packed window is one sample of several clips),
        clips, label tokens and seconds of clip audio per second; and audio-hours per GPU-hour, the
        clip audio one process (one GPU) learns from per second of its time: seconds per second =
        hours per hour. Each process counts its own batches; the others are taken to match it."""
        keys = ("steady_samples_per_second", "steady_clips_per_second", "steady_label_tokens_per_second",
                "steady_audio_seconds_per_second", "audio_hours_per_gpu_hour")
        if not self.steps:
            return {"steady_steps": 0, "steady_step_seconds": None, **dict.fromkeys(keys)}
        out = {
            "steady_steps": self.steps,
            "steady_step_seconds": self.seconds / self.steps,
            "steady_samples_per_second": samples_per_step * self.steps / self.seconds,
        }
        if self.timed.get("count_samples"):
            rate = {k: v / self.seconds for k, v in self.timed.items()}
            out.update({
                "steady_clips_per_second": rate["count_clips"] * processes,
                "steady_label_tokens_per_second": rate["count_label_tokens"] * processes,
                "steady_audio_seconds_per_second": rate["count_clip_seconds"] * processes,
                "audio_hours_per_gpu_hour": rate["count_clip_seconds"],
                "steady_clips_per_sample": self.timed["count_clips"] / self.timed["count_samples"],
            })
        return {**dict.fromkeys(keys), **out}


# Kernel (GPU) or operator (CPU) names -> what they compute. Matrix products: cuBLAS
# (nvjet, sm90_xmma, *gemm*), cutlass, bitsandbytes' int8 matmul; attention: flash/memory-
# efficient SDPA kernels. The rest is element-wise work, reductions, copies and casts.
_GEMM = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
         "aten::linear", "igemmlt", "int8_mm", "kgemm")
_ATTENTION = ("flash", "fmha", "attention", "efficient_attention")


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _GEMM):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps (start, start + steps] with torch.profiler and write where the
    time goes: wall time, time the GPU was busy, and GPU time by kind (matmul, attention,
    other = element-wise/reductions/casts, copy), plus the top kernels, to `out`.

    On a machine without CUDA the same table is built from CPU operator self-times.
    """

    def __init__(self, start: int, steps: int, out):
        self.start, self.steps, self.out = start, steps, out
        self.prof = None
        self.t0 = 0.0
        self.summary: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if self.prof is None and self.summary is None and state.global_step == self.start:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.prof is None or state.global_step < self.start + self.steps:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.summary = self.summarise(self.prof, wall, cuda=torch.cuda.is_available())
        self.prof = None
        if state.is_world_process_zero:
            self.out.write_text(self.report(self.summary))

    def summarise(self, prof, wall: float, cuda: bool) -> dict:
        from collections import Counter

        by_kind: Counter = Counter()
        by_name: Counter = Counter()
        if cuda:
            from torch.autograd import DeviceType

            for e in prof.events():
                if e.device_type == DeviceType.CUDA:
                    us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                    by_kind[kernel_category(e.name)] += us
                    by_name[e.name] += us
        else:
            for e in prof.key_averages():
                if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                    by_kind[kernel_category(e.key)] += e.self_cpu_time_total
                    by_name[e.key] += e.self_cpu_time_total
        busy = sum(by_kind.values()) / 1e6
        return {
            "steps": self.steps,
            "wall_s": wall,
            "device": "cuda" if cuda else "cpu",
            "busy_s": busy,
            "busy_fraction": busy / wall if wall else None,
            "seconds_by_kind": {k: v / 1e6 for k, v in by_kind.most_common()},
            "top": [(n, v / 1e6) for n, v in by_name.most_common(25)],
        }

    @staticmethod
    def report(s: dict) -> str:
        what = "GPU kernels" if s["device"] == "cuda" else "CPU operators (self time)"
        lines = [
            f"profile of {s['steps']} optimizer steps: wall {s['wall_s']:.3f} s, {what} {s['busy_s']:.3f} s "
            f"({100 * (s['busy_fraction'] or 0):.0f}% of the profiled wall time, which the profiler itself slows)",
            "",
            "| kind | seconds | share of busy |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} | {100 * v / s['busy_s']:.1f}% |" for k, v in s["seconds_by_kind"].items()]
        lines += ["", "| top kernels | seconds | kind |", "|---|---|---|"]
        lines += [f"| {n[:110]} | {v:.4f} | {kernel_category(n)} |" for n, v in s["top"]]
        return "\n".join(lines) + "\n"
