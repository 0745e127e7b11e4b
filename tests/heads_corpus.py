"""A labelled corpus for the heads tests, made here with espeak-ng: three classes that differ in
how they are spoken (low and slow, high and fast, whispered), voices each with texts of their
own, so that grouping by voice holds out voices and texts together. Written as
`label/v<voice>/t<text>-<jitter>.wav` at 16 kHz (~1 s each)."""

from __future__ import annotations

import io
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

VOICES = ["en", "en-us", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us-nyc"]
VARIANTS = ["m1", "f2", "m3", "f1", "m2", "f3"]
TEXTS = ["good morning", "see you soon", "thank you kindly", "call me later", "not today",
         "that is fine", "open the door", "where is it", "I agree", "hold the line",
         "right away", "never mind"]
# label -> (espeak-ng variant or None: the voice's own, pitch, words per minute)
CLASSES = {"low-slow": (None, 15, 110), "high-fast": (None, 85, 240),
           "whisper": ("whisper", 50, 170)}
JITTERS = (-4, 4)  # pitch offsets (and 3x those in words per minute): two takes of each text


def _speak(job: tuple[Path, str, str, int, int]) -> None:
    path, voice, text, pitch, rate = job
    raw = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-p", str(pitch), "-s",
                          str(rate), text], check=True, capture_output=True, timeout=60).stdout
    samples, sr = soundfile.read(io.BytesIO(raw), dtype="float32")
    assert sr == 22_050
    soundfile.write(path, resample_poly(samples, 160, 441).astype(np.float32), 16_000)


def make_corpus(root: Path, voices: int = len(VOICES), jitters=JITTERS) -> Path:
    """3 labels x `voices` voices x 2 texts x len(jitters) takes (72 clips by default)."""
    jobs = []
    for label, (variant, pitch, rate) in CLASSES.items():
        for v, (voice, own) in enumerate(list(zip(VOICES, VARIANTS))[:voices]):
            (root / label / f"v{v}").mkdir(parents=True)
            for t in (2 * v, 2 * v + 1):
                for j, jitter in enumerate(jitters):
                    jobs.append((root / label / f"v{v}" / f"t{t}-{j}.wav",
                                 f"{voice}+{variant or own}", TEXTS[t], pitch + jitter,
                                 rate + 3 * jitter))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_speak, jobs))
    return root
