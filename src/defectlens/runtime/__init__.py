"""Fast inference and deployment: where the backbone runs (eager torch, onnxruntime, OpenVINO),
exporting a fitted model to a self-contained folder of graphs, and scoring such a folder without
torch.

Modules, imported explicitly (this package imports nothing, so that `deployed` works where
torch is not installed):
- `backends`: the backbone on torch / onnxruntime / OpenVINO for a `Detector` (needs torch),
- `onnx_graph`: the backbone's ONNX graph, exported once and cached (needs torch),
- `export`: `Detector` -> deployment folder, fp32 or int8 (needs torch),
- `deployed`: a deployment folder scored with onnxruntime or OpenVINO + numpy (no torch),
- `sessions`: the inference-engine sessions both sides share (no torch).
"""
