#!/usr/bin/env bash
# Run pytest; exit code 5 ("no tests collected") is a failure for us too, but
# with a clear message instead of a silent green.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
code=$?
if [ $code -eq 5 ]; then
    echo "run-pytest: no tests were collected" >&2
    exit 1
fi
exit $code
