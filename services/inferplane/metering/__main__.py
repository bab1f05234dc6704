"""``python -m inferplane.metering``: run the metering service."""

from inferplane.metering.main import main

raise SystemExit(main())
