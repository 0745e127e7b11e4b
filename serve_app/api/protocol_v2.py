"""KServe's Open Inference Protocol v2, declared (the routes: serve_app/api/kserve.py; the
wire codec: kserve_codec.py): the models its OpenAPI description is generated from, on
protocol.py's open and closed bases. No Ray, no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from serve_app.api.protocol import Closed, Open


class V2Tensor(Open):
    """An input tensor in JSON (with the binary extension, `parameters.binary_data_size` and
    no `data`: its bytes follow the JSON header)."""

    name: str
    datatype: str = Field(description="audio: BYTES [1] (the file's base64 in JSON); waveform: "
                          "FP32 [n] or [1, n] (16 kHz mono)")
    shape: list[int]
    data: list | None = None
    parameters: dict | None = None


class V2RequestedOutput(Open):
    name: Literal["scores", "labels", "emotion", "embedding"]
    parameters: dict | None = None


class V2InferRequest(Open):
    id: str | None = None
    parameters: dict | None = Field(None, description="granularity, labels, head, "
                                    "binary_data_output")
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(Closed):
    name: str
    datatype: str
    shape: list[int]
    data: list | None = None
    parameters: dict | None = None


class V2InferResponse(Closed):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2Error(Closed):
    error: str = Field(description="the service's code, then its message")


class V2ServerMetadata(Closed):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(Closed):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(Closed):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, str] | None = Field(None, description="what the request's "
                                              "parameters may say")


class V2Live(Closed):
    live: bool


class V2Ready(Closed):
    ready: bool


class V2ModelReady(Closed):
    name: str
    ready: bool
