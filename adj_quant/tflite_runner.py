"""Run a ``.tflite`` model in the TFLite interpreter (``ai-edge-litert``), feeding inputs
with the scale and zero point the interpreter reports, and measure its accuracy."""

from __future__ import annotations

import numpy as np

from adj_quant.errors import UserError


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None):
    """A LiteRT interpreter (``tf.lite.Interpreter`` only if ai_edge_litert is missing)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    try:
        return Interpreter(model_path=model_path, model_content=model_content)
    except ValueError as err:
        raise UserError(f"{model_path}: not a TFLite model ({str(err).splitlines()[0]})")


def quantize_input(images: np.ndarray, detail: dict) -> np.ndarray:
    """Images as the input tensor's dtype, with the (scale, zero point) the interpreter reports."""
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return images.astype(dtype)
    scale, zero = detail["quantization"]
    if scale == 0:
        raise UserError("the TFLite model's integer input has no quantization parameters")
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale + zero), info.min, info.max).astype(dtype)


def dequantize_output(values: np.ndarray, detail: dict) -> np.ndarray:
    if not np.issubdtype(detail["dtype"], np.integer):
        return values.astype(np.float32)
    scale, zero = detail["quantization"]
    return (values.astype(np.float32) - zero) * scale


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Images whose label is among the top ``k`` logits; a tie at the boundary counts as a miss.

    (Quantized logits tie more often than float ones; a tie is not a correct answer.)
    """
    k = min(k, logits.shape[-1])
    mine = logits[np.arange(len(labels)), labels][:, None]
    others_at_least = (logits >= mine).sum(axis=-1) - 1
    return int((others_at_least < k).sum())


class TFLiteRunner:
    """Runs a .tflite classifier on float images in [0, 1], ``batch`` images per invoke."""

    def __init__(self, model_path: str, batch: int = 1):
        self.interpreter = make_interpreter(model_path)
        inputs, outputs = (self.interpreter.get_input_details(),
                           self.interpreter.get_output_details())
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{model_path}: expected one input and one output, found "
                            f"{len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0], outputs[0]
        shape = list(self.input["shape"])
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise UserError(f"{model_path}: input shape {shape} is not [N, S, S, 3]")
        self.img_size = int(shape[1])
        self.num_classes = int(self.output["shape"][-1])
        self.batch = 0
        self._resize(batch)

    def _resize(self, batch: int) -> None:
        if batch == self.batch:
            return
        self.interpreter.resize_tensor_input(self.input["index"],
                                             [batch, self.img_size, self.img_size, 3])
        self.interpreter.allocate_tensors()
        # The quantization parameters do not change with the batch; re-read index/dtype anyway.
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (float32) of ``images`` float32 [n, S, S, 3] in [0, 1]."""
        self._resize(len(images))
        self.interpreter.set_tensor(self.input["index"], quantize_input(images, self.input))
        self.interpreter.invoke()
        return dequantize_output(self.interpreter.get_tensor(self.output["index"]), self.output)
