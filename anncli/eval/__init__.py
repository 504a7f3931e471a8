"""Evaluation and prediction: test-time inference (`inference.py`: whole/slide, multi-scale, flip), `ann eval`
and in-training validation (`evaluate.py`), metrics (`metrics.py`), `ann predict` for torch and ONNX
networks (`predict.py`, `onnx_predict.py`) and what the user sees (`report.py`: progress, tables, events,
TensorBoard).
Imports: runs, data, models, cluster, base.
"""
