"""Per-layer times from ONNX Runtime's profiler (LiteRT's Python API has no per-op profiler)."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

from edgeopt.targets._runners import OnnxRuntimeSession

PROFILED_RUNS = 50


def onnxruntime_layer_times(model_path: Path, threads: int) -> list[dict[str, object]]:
    """Return the mean time in ms of each graph node over `PROFILED_RUNS` runs, slowest first.

    Node names are those of ONNX Runtime's optimized graph, so fused nodes (Conv with its
    activation) appear once.
    """
    with tempfile.TemporaryDirectory() as directory:
        session = OnnxRuntimeSession(model_path, threads, profile_path=Path(directory) / "ort")
        session.prepare_inputs(None)
        for _ in range(PROFILED_RUNS):
            session.run()
        trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, str] = {}
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"].removesuffix("_kernel_time")
        totals[name] += float(event["dur"]) / 1e3
        ops[name] = event.get("args", {}).get("op_name", "")
    layers = [
        {"name": name, "op": ops[name], "time_ms": total / PROFILED_RUNS}
        for name, total in totals.items()
    ]
    return sorted(layers, key=lambda layer: -float(layer["time_ms"]))
