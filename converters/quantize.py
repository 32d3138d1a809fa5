"""Static int8 quantization of ONNX models with ONNX Runtime, calibration chosen by measurement.

The model is quantized in QDQ format with int8 weights (per output channel by default) and int8
activations. Each calibration method (min-max, percentile, entropy) is tried, every candidate is
run on held-out samples, and the one with the best top-1 agreement with the float model (then the
best SQNR) is kept. Per-channel QDQ needs the `axis` attribute of DequantizeLinear (opset 13),
so older models are upgraded to opset 13 first instead of silently falling back to per-tensor.
The model's outputs stay float: the QuantizeLinear/DequantizeLinear pair that the quantizer puts
on each graph output is removed, because one per-tensor scale over an output whose channels
differ in range by orders of magnitude rounds the small channels to zero.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference, version_converter

from edgeopt._logging import get_logger
from edgeopt.converters import _onnx_graph
from edgeopt.converters.runtime import OnnxRuntime
from edgeopt.converters.verify import compare_outputs
from edgeopt.errors import ConversionError, EdgeoptInputError, ModelLoadError

logger = get_logger(__name__)

METHODS = ("minmax", "percentile", "entropy")
PER_CHANNEL_MIN_OPSET = 13
# Top-1 agreements that differ by at most this many held-out samples (or 0.2%) count as a tie,
# decided by SQNR: one or two flipped samples are within sampling noise.
_TOP1_TIE_SAMPLES = 2
# Share of the calibration samples held out to score the candidates when `held_out` is absent.
_HELD_OUT_SHARE = 0.25
_CALIBRATION_BATCH = 32
# A min-max range this many times wider than the chosen calibration's is reported as outliers.
_OUTLIER_RATIO = 5.0


@dataclass(frozen=True)
class OnnxQuantization:
    """An int8 QDQ ONNX file written by `quantize_onnx`, with the scores of every candidate."""

    path: Path
    method: str
    candidates: dict[str, dict[str, float | None]]
    opset: int
    per_channel: bool = True
    source_opset: int = 0
    notes: list[str] = field(default_factory=list)


class _Reader:
    """CalibrationDataReader over a numpy array, in batches the model accepts."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int) -> None:
        self.input_name = input_name
        self.data = data
        self.batch = batch
        self._iterator = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.data), self.batch):
            chunk = self.data[start : start + self.batch]
            if len(chunk) < self.batch and self.batch != len(self.data):
                chunk = chunk[np.arange(self.batch) % len(chunk)]
            yield {self.input_name: chunk}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = self._batches()


def _opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _prepare(src: Path, work: Path, per_channel: bool) -> tuple[Path, int, int, list[str]]:
    """Upgrade the opset where per-channel needs it and run ORT's pre-processing."""
    notes = []
    try:
        model = onnx.load(str(src))
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelLoadError(f"cannot load ONNX model {src}: {exc}") from exc
    source_opset = _opset_of(model)
    opset = source_opset
    minimum = PER_CHANNEL_MIN_OPSET if per_channel else 10
    # IR 3 files must list initializers as graph inputs; some (CNTK's) do not, which the version
    # converter rejects. IR 7 drops that rule and covers opsets up to 13.
    initializer_names = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 7)
    if opset < minimum:
        try:
            model = version_converter.convert_version(shape_inference.infer_shapes(model), minimum)
        except (RuntimeError, version_converter.ConvertError, onnx.checker.ValidationError) as exc:
            raise ConversionError(
                f"{src} uses opset {opset}, and {'per-channel ' if per_channel else ''}int8 QDQ "
                f"needs opset {minimum}, but the upgrade failed: {exc}; re-export the model at "
                f"opset {minimum} or later"
            ) from exc
        notes.append(f"opset raised from {opset} to {minimum} for QDQ quantization")
        logger.info("raised the opset of %s from %d to %d for quantization", src, opset, minimum)
        opset = minimum
    upgraded = work / "upgraded.onnx"
    onnx.save(model, upgraded)
    prepared = work / "prepared.onnx"
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(upgraded), str(prepared), skip_symbolic_shape=True)
    # quant_pre_process fails in several ways on unusual graphs; quantization still works
    # without it, only with less fusion.
    except Exception as exc:
        logger.info("ONNX Runtime pre-processing failed (%s); quantizing without it", exc)
        shutil.copy(upgraded, prepared)
    return prepared, opset, source_opset, notes


# Ops through which the float tail of a model is followed back from its outputs: they have one
# data input and no weights, so keeping them in float costs little.
_TAIL_OPS = {
    "Relu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "HardSigmoid",
    "HardSwish",
    "Softmax",
    "LogSoftmax",
    "Identity",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
}


def _strip_output_qdq(path: Path) -> None:
    """Keep the model's tail in float: drop Q/DQ pairs between the last weighted op and outputs.

    Starting at each graph output, the walk goes back through activation and reshaping ops and
    removes every QuantizeLinear/DequantizeLinear pair on the way, stopping at the first other
    op (Conv, Gemm, MatMul, ...), whose inputs stay quantized.
    """
    model = onnx.load(str(path))
    graph = model.graph

    def producers() -> dict[str, onnx.NodeProto]:
        return {out: node for node in graph.node for out in node.output}

    def consumer_count(name: str) -> int:
        outputs = sum(o.name == name for o in graph.output)
        return outputs + sum(name in node.input for node in graph.node)

    def pair_source(name: str) -> tuple[onnx.NodeProto, onnx.NodeProto, str] | None:
        by_output = producers()
        dequantize = by_output.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        quantize = by_output.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            return None
        source = quantize.input[0]
        if consumer_count(quantize.output[0]) != 1 or source not in by_output:
            return None
        return quantize, dequantize, source

    for output in graph.output:
        name = output.name
        while True:
            found = pair_source(name)
            if found is not None:
                quantize, dequantize, source = found
                graph.node.remove(quantize)
                graph.node.remove(dequantize)
                is_output = any(o.name == name for o in graph.output)
                if is_output and consumer_count(source) == 0:
                    _onnx_graph.rename_value(model, source, name)
                elif is_output:
                    graph.node.append(onnx.helper.make_node("Identity", [source], [name]))
                    name = source
                else:
                    for node in graph.node:
                        node.input[:] = [source if i == name else i for i in node.input]
                    name = source
                continue
            node = producers().get(name)
            if node is None or node.op_type not in _TAIL_OPS or consumer_count(name) != 1:
                break
            name = node.input[0]
    onnx.save(model, path)


def _calibrate(
    prepared: Path, data: np.ndarray, method: str, batch: int, cache: Path, work: Path
) -> None:
    """Compute activation ranges with onnxruntime's calibrators and save them to `cache`."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        create_calibrator,
        save_tensors_data,
    )

    # The KL search of entropy calibration tries thresholds from num_quantized_bins / 2 bins
    # either side of zero up to the maximum. With onnxruntime's defaults (128 and 128) that
    # leaves only the maximum, i.e. min-max again. With 2048 and 64 the smallest threshold is
    # 1/32 of the largest value seen, so a few outliers 100× beyond the bulk can be clipped. More
    # bins would reach further, but the search is a Python loop that gets slow past ~2048 bins.
    settings = {
        "minmax": (CalibrationMethod.MinMax, {}),
        "percentile": (CalibrationMethod.Percentile, {"percentile": 99.99, "num_bins": 2048}),
        "entropy": (CalibrationMethod.Entropy, {"num_bins": 2048, "num_quantized_bins": 64}),
    }
    calibrate_method, options = settings[method]
    input_name = OnnxRuntime(prepared).input_names[0]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrator = create_calibrator(
            prepared,
            augmented_model_path=str(work / f"augmented_{method}.onnx"),
            calibrate_method=calibrate_method,
            extra_options=options,
        )
        calibrator.collect_data(_Reader(input_name, data, batch))
        save_tensors_data(calibrator.compute_data(), cache)


def _quantize_once(
    prepared: Path, dst: Path, data: np.ndarray, method: str, per_channel: bool, batch: int
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    cache = dst.with_suffix(".ranges.json")
    _calibrate(prepared, data, method, batch, cache, dst.parent)
    extra: dict[str, Any] = {"QDQKeepRemovableActivations": True}
    for attempt in range(2):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(prepared),
                    str(dst),
                    None,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=calibrate,
                    extra_options=extra,
                    calibration_cache_path=str(cache),
                )
            break
        except ValueError as exc:
            # onnxruntime 1.32's per-channel bias-scale adjustment fails on a bias that is not
            # 1-D ("truth value of an array ... is ambiguous"); quantize once more without it.
            if attempt or "ambiguous" not in str(exc):
                raise
            logger.info("retrying quantization without the int32 bias-scale adjustment: %s", exc)
            extra["QDQDisableWeightAdjustForInt32Bias"] = True
    cache.unlink(missing_ok=True)
    _strip_output_qdq(dst)


def _score(reference: Mapping[str, np.ndarray], path: Path, data: np.ndarray) -> dict[str, Any]:
    outputs = OnnxRuntime(path).run(data)
    comparisons = compare_outputs(reference, outputs)
    top1 = [c.top1_agreement for c in comparisons.values() if c.top1_agreement is not None]
    return {
        "sqnr_db": float(min(c.sqnr_db for c in comparisons.values())),
        "top1_agreement": float(min(top1)) if top1 else None,
        "cosine": float(min(c.cosine for c in comparisons.values())),
    }


def _best(candidates: dict[str, dict[str, Any]], samples: int) -> str:
    """Pick the best top-1 agreement, and among near-ties the best SQNR."""
    tie = max(0.002, _TOP1_TIE_SAMPLES / max(samples, 1))
    top = max((s["top1_agreement"] or 0.0) for s in candidates.values())
    near = {m: s for m, s in candidates.items() if (s["top1_agreement"] or 0.0) >= top - tie}
    return max(near, key=lambda m: near[m]["sqnr_db"])


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray,
    *,
    method: str = "auto",
    per_channel: bool = True,
    held_out: np.ndarray | None = None,
) -> OnnxQuantization:
    """Quantize an fp32 ONNX model to int8 QDQ with ONNX Runtime's static quantization.

    Args:
        src: The float ONNX model.
        dst: Where to write the int8 model.
        calibration: float32 inputs (N, ...) for the single model input, normalised as the model
            expects; a few hundred representative samples.
        method: `auto` to try min-max, percentile and entropy calibration and keep the best on
            held-out data, or one of those names.
        per_channel: One weight scale per output channel (raises the opset to 13 if needed).
        held_out: Samples to score the candidates on. Default: a fixed random quarter of
            `calibration`, which is then not used to calibrate the candidates; the chosen method
            is re-calibrated on all samples.

    Raises:
        EdgeoptInputError: Invalid method or calibration data.
        ConversionError: Quantization failed.
    """
    if method != "auto" and method not in METHODS:
        raise EdgeoptInputError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim < 2 or len(calibration) == 0:
        raise EdgeoptInputError(
            f"calibration must be a non-empty array (N, ...), got shape {calibration.shape}"
        )
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelLoadError(f"ONNX model {src} not found")
    methods = list(METHODS) if method == "auto" else [method]
    recalibrate = False
    if held_out is None:
        if len(methods) > 1 and len(calibration) >= 8:
            # A fixed shuffle, so that samples appended at the end are not all held out.
            order = np.random.default_rng(0).permutation(len(calibration))
            split = max(1, round(len(calibration) * (1 - _HELD_OUT_SHARE)))
            calibration, held_out = calibration[order[:split]], calibration[order[split:]]
            recalibrate = True
        else:
            held_out = calibration
    held_out = np.asarray(held_out, dtype=np.float32)
    full_calibration = np.concatenate([calibration, held_out]) if recalibrate else calibration

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared, opset, source_opset, notes = _prepare(src, work, per_channel)
        reference_runtime = OnnxRuntime(src)
        batch = reference_runtime.fixed_batch or _CALIBRATION_BATCH
        reference = reference_runtime.run(held_out)
        candidates: dict[str, dict[str, Any]] = {}
        for name in methods:
            candidate_path = work / f"{name}.onnx"
            try:
                _quantize_once(prepared, candidate_path, calibration, name, per_channel, batch)
            except (RuntimeError, ValueError, KeyError) as exc:
                logger.warning("%s calibration failed for %s: %s", name, src, exc)
                logger.debug("calibration traceback", exc_info=exc)
                continue
            candidates[name] = _score(reference, candidate_path, held_out)
            logger.info("int8 candidate %s: %s", name, candidates[name])
        if not candidates:
            raise ConversionError(
                f"every calibration method failed for {src}; check that calibration matches the "
                "model input (run with EDGEOPT_LOG_LEVEL=DEBUG for details)"
            )
        chosen = _best(candidates, len(held_out))
        robust = (
            chosen
            if chosen != "minmax"
            else next((name for name in ("percentile", "entropy") if name in candidates), None)
        )
        if robust is not None and "minmax" in candidates:
            note = _outlier_note(work / "minmax.onnx", work / f"{robust}.onnx", robust, chosen)
            if note:
                notes.append(note)
                logger.warning("%s: %s", src.name, note)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if recalibrate:
            _quantize_once(prepared, dst, full_calibration, chosen, per_channel, batch)
        else:
            shutil.copy(work / f"{chosen}.onnx", dst)
    logger.info("wrote %s with %s calibration (opset %d)", dst, chosen, opset)
    return OnnxQuantization(
        path=dst,
        method=chosen,
        candidates=candidates,
        opset=opset,
        per_channel=per_channel,
        source_opset=source_opset,
        notes=notes,
    )


def _outlier_note(
    minmax_path: Path, robust_path: Path, robust_name: str, chosen: str
) -> str | None:
    """Describe how far outliers stretch min-max ranges beyond a robust calibration's.

    Written whichever method was chosen: when min-max still scored best on held-out data, the
    inflation is reported so that the caller can check the calibration data.
    """
    minmax, robust = activation_ranges(minmax_path), activation_ranges(robust_path)
    ratios = {
        name: (minmax[name][1] - minmax[name][0]) / (high - low)
        for name, (low, high) in robust.items()
        if name in minmax and high > low
    }
    if not ratios:
        return None
    tensor = max(ratios, key=ratios.__getitem__)
    if ratios[tensor] <= _OUTLIER_RATIO:
        return None
    if chosen == "minmax":
        return (
            f"calibration data contains outliers: min-max widens the range of '{tensor}' "
            f"{ratios[tensor]:.1f}× beyond {robust_name} calibration; min-max was kept because "
            "it scored best on the held-out samples, but check the calibration data"
        )
    return (
        f"calibration data contains outliers: min-max would widen the range of '{tensor}' "
        f"{ratios[tensor]:.1f}× beyond {chosen} calibration, which was used instead"
    )


def activation_ranges(path: str | Path) -> dict[str, tuple[float, float]]:
    """Return the float range (min, max) that each activation QuantizeLinear can represent."""
    model = onnx.load(str(path))
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    ranges = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        scale = constants.get(node.input[1])
        zero = constants.get(node.input[2]) if len(node.input) > 2 else np.int8(0)
        if scale is None or np.size(scale) != 1:
            continue
        info = np.iinfo(np.asarray(zero).dtype)
        low = (info.min - int(np.asarray(zero).item())) * float(scale)
        high = (info.max - int(np.asarray(zero).item())) * float(scale)
        ranges[node.input[0]] = (low, high)
    return ranges
