#!/usr/bin/env bash
# Installs what the test suite drives besides Python: node's yjs + y-websocket (wire
# compatibility with the original JavaScript agents), Debian's Chromium (web page) and
# Debian's redis-server (replicas of a market, tests/test_market_replicas.py).
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
if ! command -v redis-server >/dev/null; then
  echo "test tools: installing redis-server (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
# The OpenAI Agents SDK, a client of the gateway's Responses API in the tests, gets a
# venv of its own: it pins websockets<17, which would change the websockets igora's own
# tests run with (tests/test_agent_frameworks.py, tests/agents_sdk_run.py).
if ! .venv/agents/bin/python -c "import agents" 2>/dev/null; then
  echo "test tools: installing the OpenAI Agents SDK in .venv/agents"
  python3 -m venv .venv/agents
  .venv/agents/bin/pip install --quiet --progress-bar off "openai-agents==0.24.0"
fi
echo "test tools: node $(node --version), $(chromium --version 2>/dev/null || echo 'no chromium'), $(redis-server --version | cut -d' ' -f1-3)"
