#!/usr/bin/env bash
# The browser test drives Debian's Chromium (never a browser downloaded by Playwright).
# CI runs as root on a fresh machine: install it there; elsewhere say how.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium for the browser test..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "note: /usr/bin/chromium is missing; the browser test will be skipped (sudo apt-get install chromium)" >&2
fi
