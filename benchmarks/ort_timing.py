"""Interleaved ONNX Runtime timing shared by the ONNX benchmarks: sessions on the CPU with a
fixed thread count, runs of the files taken in turn (the machine drifts), medians."""

from __future__ import annotations

import statistics
import time

import onnxruntime as ort


def session(path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_medians(runs: dict[str, tuple[ort.InferenceSession, dict]], repeats: int) -> dict[str, float]:
    """Median seconds of ``session.run(None, feed)`` for each ``name: (session, feed)``, the
    names run in turn ``repeats`` times after one warm-up run each."""
    for sess, feed in runs.values():
        sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (sess, feed) in runs.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
