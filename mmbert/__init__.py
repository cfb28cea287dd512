"""mmbert: distributed training, evaluation and ONNX export of text + tabular classifiers
that fuse a BERT encoder with tabular features through cross-attention.

    import mmbert
    run = mmbert.train("womens_clothing", output_dir="runs/api", max_steps=50)
    model = mmbert.load(run.model_dir)      # a model directory (PyTorch) or an export folder (onnxruntime)
    model.predict(df)                       # labels in the training data's own values

`import mmbert` itself imports no torch: the functions load what they need when called.
"""
__version__ = "0.2.0"
__all__ = ["load", "train", "evaluate", "export_onnx", "Predictor", "TrainResult", "EvalResult"]


def __getattr__(name):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmbert' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *__all__])
