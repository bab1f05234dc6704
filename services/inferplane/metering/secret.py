"""The server-side HMAC secret that API keys are hashed with.

From the settings' ``secret`` value when given, else from ``secret_file``, which is created (32 random
bytes as hex, mode 0600) on first use. The service and the CLI may race to create it: the file appears
whole (written aside, then linked into place) and the first one wins.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from pydantic import SecretStr

log = logging.getLogger(__name__)


def load_secret(*, secret: SecretStr | None, secret_file: Path) -> bytes:
    """The HMAC secret as bytes: ``secret`` when set, else the contents of ``secret_file``."""
    if secret is not None:
        value = secret.get_secret_value()
        if not value:
            raise ValueError("metering secret is empty")
        return value.encode("utf-8")
    path = Path(secret_file).expanduser()
    if not path.exists():
        _create_secret_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("metering secret file %s is readable by others (mode %o); chmod 600 it", path, mode)
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ValueError(f"metering secret file {path} is empty")
    return value.encode("utf-8")


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic create-if-absent, with the content already in place
            log.info("created metering secret file %s", path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        os.unlink(tmp)
