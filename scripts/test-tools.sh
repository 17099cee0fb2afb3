#!/usr/bin/env bash
# Installs what the test suite drives besides Python: node's yjs + y-websocket (wire
# compatibility with the original JavaScript agents) and Debian's Chromium (web page).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "test tools: installing Node.js and npm (Debian packages)"
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
(cd tests/js && npm install --no-audit --no-fund --loglevel=error)
if ! command -v chromium >/dev/null; then
  echo "test tools: installing Chromium (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "test tools: node $(node --version), $(chromium --version 2>/dev/null || echo 'no chromium')"
