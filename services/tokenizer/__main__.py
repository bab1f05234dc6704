"""``python -m services.tokenizer``."""

from services.tokenizer.main import main

main()
