from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edgeopt.errors import TargetError
from edgeopt.targets import get_target
from edgeopt.targets._adb import AdbTarget, parse_benchmark_output, to_latency_stats

DATA = Path(__file__).parent / "data"


def _read(name: str) -> str:
    return (DATA / name).read_text()


def test_parse_timings_line() -> None:
    result = parse_benchmark_output(_read("benchmark_model_xnnpack.txt"))
    assert result.init_us == 3412
    assert result.first_inference_us == 402
    assert result.warmup_avg_us == 171.6
    assert result.inference_avg_us == 170.4


def test_parse_run_lines() -> None:
    result = parse_benchmark_output(_read("benchmark_model_xnnpack.txt"))
    assert result.runs == 29304
    assert result.warmup_runs == 2911
    assert result.std_us == 9
    assert result.min_us == 164
    assert result.median_us is None


def test_parse_memory_and_size() -> None:
    result = parse_benchmark_output(_read("benchmark_model_xnnpack.txt"))
    assert result.memory_init_mb == pytest.approx(2.91797)
    assert result.memory_overall_mb == pytest.approx(3.66016)
    assert result.peak_memory_mb is None
    assert result.file_size_mb == pytest.approx(0.281888)
    assert result.threads == 1


def test_parse_percentiles_and_peak() -> None:
    result = parse_benchmark_output(_read("benchmark_model_percentiles.txt"))
    assert result.median_us == 1189
    assert result.runs == 1671
    assert result.peak_memory_mb == pytest.approx(9.875)
    assert result.threads == 4


def test_stats_prefer_printed_median() -> None:
    result = parse_benchmark_output(_read("benchmark_model_percentiles.txt"))
    stats = to_latency_stats(result, file_size_bytes=1000, threads=4)
    assert stats.median_ms == pytest.approx(1.189)
    assert stats.mean_ms == pytest.approx(1.1967)
    assert stats.peak_memory_bytes == int(9.875 * 1024 * 1024)
    assert stats.source == "measured-device"
    assert stats.estimate is False


def test_stats_without_median_use_mean() -> None:
    result = parse_benchmark_output(_read("benchmark_model_xnnpack.txt"))
    stats = to_latency_stats(result, file_size_bytes=1000, threads=1)
    assert stats.median_ms == pytest.approx(0.1704)
    assert stats.p90_ms > stats.median_ms
    assert stats.peak_memory_bytes == int(3.66016 * 1024 * 1024)


def test_failed_run_raises() -> None:
    with pytest.raises(TargetError, match=r"Could not open|Benchmarking failed"):
        parse_benchmark_output(_read("benchmark_model_failed.txt"))


def test_missing_adb_is_target_error(
    tmp_path: Path, tflite_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEOPT_ADB", str(tmp_path / "no-such-adb"))
    target = get_target("android-adb")
    usable, reason = target.available()
    assert usable is False
    assert "adb not found" in reason
    with pytest.raises(TargetError, match="adb not found"):
        target.measure(tflite_model)


def _fake_adb(tmp_path: Path, output_file: str) -> Path:
    """Write a stand-in adb that logs its arguments and prints a recorded benchmark output."""
    script = tmp_path / "adb"
    log = tmp_path / "adb.log"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'case "$*" in\n'
        '  *devices*) printf "List of devices attached\\nemulator-5554\\tdevice\\n" ;;\n'
        f"  *benchmark_model*) cat {DATA / output_file} ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_measure_through_fake_adb(tmp_path: Path, tflite_model: Path) -> None:
    adb = _fake_adb(tmp_path, "benchmark_model_xnnpack.txt")
    target = AdbTarget("android-test", 1, adb=str(adb), serial="emulator-5554")
    assert target.available() == (True, "")
    stats = target.measure(tflite_model, budget_s=2)
    assert stats.median_ms == pytest.approx(0.1704)
    assert stats.file_size_bytes == tflite_model.stat().st_size
    calls = (tmp_path / "adb.log").read_text().splitlines()
    assert calls[1].startswith("-s emulator-5554 push ")
    assert "--num_threads=1" in calls[2]
    assert "--use_xnnpack=true" in calls[2]
    assert "--min_secs=2" in calls[2]
    assert calls[3].startswith("-s emulator-5554 shell rm -f /data/local/tmp/edgeopt-")


def test_failed_benchmark_through_fake_adb(tmp_path: Path, tflite_model: Path) -> None:
    adb = _fake_adb(tmp_path, "benchmark_model_failed.txt")
    target = AdbTarget("android-test", 1, adb=str(adb))
    with pytest.raises(TargetError, match="no 'Inference timings in us' line"):
        target.measure(tflite_model)


def test_unknown_serial_unavailable(tmp_path: Path) -> None:
    adb = _fake_adb(tmp_path, "benchmark_model_xnnpack.txt")
    target = AdbTarget("android-test", 1, adb=str(adb), serial="phone-42")
    usable, reason = target.available()
    assert usable is False
    assert "phone-42" in reason


def test_adb_target_rejects_onnx(onnx_model: Path) -> None:
    with pytest.raises(TargetError, match=r"runs \.tflite files"):
        get_target("android-adb").measure(onnx_model)
