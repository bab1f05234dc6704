#!/usr/bin/env bash
# The usage dashboard's test (tests/e2e/test_dashboard.py) drives headless Chromium: install Debian's `chromium`
# when no Chromium is on PATH and this runs as root (CI, the project's machines); otherwise say so and go on (the
# test skips locally without a browser and fails under CI=true).
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: no Chromium found and cannot apt-get install it (not root, or no apt-get)" >&2
  exit 0
fi
echo "ensure_chromium: installing Debian's chromium ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
