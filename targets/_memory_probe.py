"""Child process that reports the peak resident-set growth of loading and running one model.

Run as `python -m edgeopt.targets._memory_probe MODEL RUNTIME THREADS`. It imports the runtime
first, then reads the resident set size (VmRSS), resets the peak (VmHWM, by writing 5 to
/proc/self/clear_refs), loads the model, runs it a few times and prints the growth of the peak
as one JSON line. Linux only: elsewhere it prints null.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = 5


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def main(argv: list[str]) -> int:
    model_path, runtime, threads = Path(argv[0]), argv[1], int(argv[2])
    if runtime == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import ai_edge_litert.interpreter  # noqa: F401
    from edgeopt.targets._runners import open_session

    before = _status_kib("VmRSS")
    growth: int | None = None
    if before is not None and _reset_peak():
        session = open_session(model_path, runtime, threads)
        session.prepare_inputs(None)
        for _ in range(RUNS):
            session.run()
        peak = _status_kib("VmHWM")
        if peak is not None:
            growth = max(peak - before, 0) * 1024
    sys.stdout.write(json.dumps({"peak_rss_growth_bytes": growth}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
