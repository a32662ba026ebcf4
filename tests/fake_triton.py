"""A stand-in for Triton's `triton_python_backend_utils`, used only because no Triton server runs here.

BLS requests are executed by a real onnxruntime session on the exported denoiser,
with the `reshape` that the denoiser's config.pbtxt declares for t and y.
"""

import numpy as np
import onnxruntime as ort

SESSIONS = {}


class TritonError:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self._error = output_tensors, error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class InferenceRequest:
    def __init__(self, model_name=None, requested_output_names=(), inputs=()):
        self.model_name, self.requested_output_names, self.inputs = (
            model_name,
            list(requested_output_names),
            list(inputs),
        )

    def exec(self):
        session = SESSIONS[self.model_name]
        feeds = {t.name(): t.as_numpy().reshape(-1) if t.name() in ("t", "y") else t.as_numpy() for t in self.inputs}
        outputs = session.run(self.requested_output_names, feeds)
        return InferenceResponse([Tensor(n, a) for n, a in zip(self.requested_output_names, outputs)])


def get_input_tensor_by_name(request, name):
    return next((t for t in request.inputs if t.name() == name), None)


def get_output_tensor_by_name(response, name):
    return next((t for t in response.output_tensors if t.name() == name), None)


def register(model_name, onnx_path):
    SESSIONS[model_name] = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
