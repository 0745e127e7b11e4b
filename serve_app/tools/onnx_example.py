"""The emotion in a wav file, from the exported model: python example.py clip.wav
Needs onnxruntime, numpy and soundfile only, and model.onnx, model.onnx.data, model.json here."""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf

here = Path(__file__).resolve().parent
meta = json.loads((here / "model.json").read_text())
audio, rate = sf.read(sys.argv[1], dtype="float32", always_2d=True)
if rate != meta["sample_rate"]:
    sys.exit(f"{sys.argv[1]} is {rate} Hz: resample it to {meta['sample_rate']} Hz first")
waveform = np.ascontiguousarray(audio.mean(axis=1)[None, :])  # mono, a batch of one clip
lengths = np.array([waveform.shape[1]], dtype=np.int64)
session = ort.InferenceSession(str(here / "model.onnx"), providers=["CPUExecutionProvider"])
(scores,) = session.run(["scores"], {"waveform": waveform, "lengths": lengths})
names = [label["name"] for label in meta["labels"]]
best = int(np.argmax(scores[0]))
print(f"emotion: {names[best]} ({scores[0][best]:.4f})")
print("scores:", ", ".join(f"{name} {score:.4f}" for name, score in zip(names, scores[0])))
