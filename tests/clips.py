"""Test audio made on the spot: tones, noise and (with espeak-ng) speech, in several formats,
sample rates and channel counts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile

SPEECH = {
    "speech_en": ("en", "I can't believe you did that, this is wonderful news!"),
    "speech_slow": ("en-us", "Please leave me alone. I am very tired today."),
}


def tone(seconds: float, rate: int, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """A voiced-like signal: a harmonic tone with vibrato and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * freq * t + 3 * np.sin(2 * np.pi * 5 * t)
    signal = sum(np.sin(k * phase) / k for k in range(1, 6))
    noise = np.random.default_rng(seed).standard_normal(len(t)) * 0.02
    return (0.3 * signal / 2.3 + noise).astype(np.float32)


def write(path: Path, samples: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    soundfile.write(path, samples, rate, subtype=subtype)
    return path


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def make_all(folder: Path) -> dict[str, Path]:
    clips = {
        "tone_16k_mono_wav": write(folder / "tone_16k.wav", tone(2.0, 16_000), 16_000),
        "tone_5s_16k_wav": write(folder / "tone_5s.wav", tone(5.0, 16_000, 180.0, 1), 16_000),
        "stereo_44k_flac": write(
            folder / "stereo_44k.flac",
            np.stack([tone(1.5, 44_100, 200.0, 2), tone(1.5, 44_100, 330.0, 3)], axis=1),
            44_100),
        "noise_22k_ogg": write(
            folder / "noise_22k.ogg",
            (np.random.default_rng(4).standard_normal(22_050 * 2) * 0.1).astype(np.float32),
            22_050, "VORBIS"),
        "tone_48k_mp3": write(folder / "tone_48k.mp3", tone(2.0, 48_000, 250.0, 5), 48_000,
                              "MPEG_LAYER_III"),
        "tone_8k_24bit_wav": write(folder / "tone_8k_24.wav", tone(1.0, 8_000, 150.0, 6), 8_000,
                                   "PCM_24"),
    }
    if espeak_available():
        for name, (voice, text) in SPEECH.items():
            path = folder / f"{name}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True,
                           timeout=60, capture_output=True)
            clips[name] = path
    return clips
