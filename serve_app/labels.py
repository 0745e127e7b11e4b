"""Label names shared by the model side and the HTTP side (no torch, no Ray)."""

from __future__ import annotations


def english_name(label: str) -> str:
    """FunASR's '生气/angry' -> 'angry'; '<unk>' -> 'unknown'."""
    if label == "<unk>":
        return "unknown"
    return label.rsplit("/", 1)[-1]
