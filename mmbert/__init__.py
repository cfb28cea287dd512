"""mmbert: distributed training, evaluation and ONNX export of text + tabular classifiers
that fuse a BERT encoder with tabular features through cross-attention."""
__version__ = "0.1.0"
