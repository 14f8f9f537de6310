#!/usr/bin/env bash
# The test command: bash tests/run.sh [pytest args]
# Installs what it needs on first run (scripts/env.sh), then runs the CPU suite on all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
workers="${HEARTBEAT_TEST_WORKERS:-$(python -c 'import os;print(min(4, os.cpu_count() or 1))')}"
set +e
python -m pytest -n "$workers" -q -ra "$@" tests
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "tests/run.sh: pytest collected no tests: failing"; exit 1; fi
exit $rc
