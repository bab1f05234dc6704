"""``python -m services.metering``: run the metering service."""

from services.metering.main import main

raise SystemExit(main())
