"""The embedded default: a small CLIP trained here on Fashion-MNIST, and its offline evaluation data."""
from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
EMBEDDED_NAME = "fmnist_clip"
EMBEDDED_CONFIG = EMBEDDED_DIR / f"{EMBEDDED_NAME}.json"
EMBEDDED_CHECKPOINT = EMBEDDED_DIR / f"{EMBEDDED_NAME}.safetensors"
EMBEDDED_RECORD = EMBEDDED_DIR / f"{EMBEDDED_NAME}_record.json"  # how the checkpoint was made + its evaluation figures
