"""Export backends: ONNX and TFLite writers, quantization, runtimes and verification."""
