"""``python -m inferplane.gateway``."""

from inferplane.gateway.main import main

main()
