"""``python -m inferplane.tokenizer``."""

from inferplane.tokenizer.main import main

main()
