#!/usr/bin/env bash
# Debian packages the test suite uses: chromium (the browser test drives Debian's Chromium, never a
# browser downloaded by Playwright) and python3.11-doc (the Python FAQ chat set).
# CI runs as root on a fresh machine: install them there; elsewhere say how.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -d /usr/share/doc/python3.11/html/_sources/faq ] || missing+=(python3.11-doc)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian ${missing[*]} for the tests..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "note: missing ${missing[*]}; the tests that need them are skipped (sudo apt-get install ${missing[*]})" >&2
fi
