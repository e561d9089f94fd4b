"""Export a registered model version for serving: ONNX with parity checks, INT8 (QDQ), TensorRT
engines where a CUDA device is present, and a Triton model repository; everything attached to the
model version in MLflow."""
