"""What ships with the package: the default model catalog and the tiny-llama checkpoint it names.

They travel as package data, so ``inferplane up`` finds them from any directory of any install.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
CATALOG = ASSETS / "catalog.yaml"
TINY_LLAMA = ASSETS / "models" / "tiny-llama"
