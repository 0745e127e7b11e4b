"""Conversations made on the spot: two espeak-ng voices taking turns, with known turn times
and known silences between them, and noise under everything. A turn's times are where its
speech is (espeak's own leading and trailing silence trimmed), so VAD can be held to them.

A call can also be written as two channels (each speaker on its own, as call centres record),
tiled to any length (the 30-minute recording), and described as RTTM or JSON segments.
"""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile
import soxr

RATE = 16_000
# Two voices that sound apart: a low male US voice and a higher female variant.
VOICES = {"agent": ("en-us", 40, 165), "customer": ("en-us+f3", 75, 150)}  # voice, pitch, wpm
SCRIPT = [
    ("agent", "Good morning, thank you for calling. How can I help you today?"),
    ("customer", "Hello. I was charged twice for the same order last week."),
    ("agent", "I am sorry to hear that. Let me look at your account."),
    ("customer", "This is the third time it has happened, and I am really tired of it."),
    ("agent", "I can see both payments. I will refund the second one right now."),
    ("customer", "Thank you, that is wonderful news."),
]
# Silence before each turn (the first: after the start of the recording), in seconds: each
# longer than VAD's min_silence_s (0.5) plus twice its padding, so that turns stay apart.
GAPS = [0.6, 1.0, 0.8, 1.3, 0.9, 1.1]
NOISE_STD = 0.004   # about -48 dBFS of white noise under the whole recording
SPEECH_FLOOR = 1e-3  # espeak-ng writes digital silence: anything above is its speech


@dataclass(frozen=True)
class Turn:
    speaker: str
    start_s: float  # first and last sample of speech, in seconds
    end_s: float
    text: str


@dataclass
class Conversation:
    left: np.ndarray    # float32 at RATE: the agent's channel (speech of "agent" only)
    right: np.ndarray   # the customer's channel
    turns: list[Turn]

    @property
    def mono(self) -> np.ndarray:
        """Both voices on one channel (noise under it), as a phone records a call."""
        return ((self.left + self.right) / 2).astype(np.float32)

    @property
    def duration_s(self) -> float:
        return len(self.left) / RATE

    def wav_bytes(self, split: bool = False, subtype: str = "PCM_16") -> bytes:
        samples = np.stack([self.left, self.right], axis=1) if split else self.mono
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, RATE, format="WAV", subtype=subtype)
        return buffer.getvalue()

    def write(self, path: Path, split: bool = False) -> Path:
        path.write_bytes(self.wav_bytes(split))
        return path

    def rttm(self, file_id: str = "call", channels: bool = False) -> str:
        """What a diarization tool writes: one SPEAKER line per turn."""
        names = {"agent": "ch0", "customer": "ch1"} if channels else {}
        return "".join(
            f"SPEAKER {file_id} 1 {turn.start_s:.3f} {turn.end_s - turn.start_s:.3f} <NA> <NA> "
            f"{names.get(turn.speaker, turn.speaker)} <NA> <NA>\n" for turn in self.turns)

    def segments_json(self, speakers: bool = True) -> str:
        return json.dumps([{"start_s": round(t.start_s, 3), "end_s": round(t.end_s, 3),
                            **({"speaker": t.speaker} if speakers else {})}
                           for t in self.turns])


@cache
def speech(speaker: str, text: str) -> np.ndarray:
    """The turn's speech at RATE, its leading and trailing silence trimmed."""
    voice, pitch, words_per_minute = VOICES[speaker]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "turn.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s",
                        str(words_per_minute), "-w", str(path), text], check=True, timeout=60,
                       capture_output=True)
        samples, rate = soundfile.read(path, dtype="float32")
    samples = soxr.resample(samples, rate, RATE).astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > SPEECH_FLOOR)
    return samples[loud[0]:loud[-1] + 1]


def make(script: list[tuple[str, str]] = tuple(SCRIPT), gaps: list[float] = tuple(GAPS),
         tail_s: float = 1.0, seed: int = 0) -> Conversation:
    """The script spoken turn by turn after each gap, then `tail_s` of silence."""
    pieces, turns, position = [], [], 0
    for (speaker, text), gap in zip(script, gaps, strict=True):
        position += round(gap * RATE)
        samples = speech(speaker, text)
        pieces.append((speaker, position, samples))
        turns.append(Turn(speaker, position / RATE, (position + len(samples)) / RATE, text))
        position += len(samples)
    total = position + round(tail_s * RATE)
    noise = np.random.default_rng(seed).standard_normal((2, total)).astype(np.float32)
    left, right = noise[0] * NOISE_STD, noise[1] * NOISE_STD
    for speaker, start, samples in pieces:
        channel = left if speaker == "agent" else right
        channel[start:start + len(samples)] += samples
    return Conversation(left, right, turns)


def tile(conversation: Conversation, seconds: float) -> Conversation:
    """The conversation repeated until it lasts at least `seconds` (a long call)."""
    copies = max(1, int(np.ceil(seconds / conversation.duration_s)))
    length = len(conversation.left)
    turns = [Turn(t.speaker, t.start_s + k * length / RATE, t.end_s + k * length / RATE,
                  t.text) for k in range(copies) for t in conversation.turns]
    return Conversation(np.tile(conversation.left, copies), np.tile(conversation.right, copies),
                        turns)
