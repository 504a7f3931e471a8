"""Networks: dilated deep-stem ResNets (`resnet.py`), anchor pooling and APNB/AFNB/non-local attention
(`anchors.py`, `attention.py`), the network shell (`segmentor.py`), the official ANN and its baselines
(`ann.py`) and mmsegmentation's variant (`mmseg.py`).
Imports: base only.
"""
