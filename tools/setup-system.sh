#!/usr/bin/env bash
# Install the Debian 12 packages p11guard needs. Idempotent: apt runs only when
# something is missing. Usage: tools/setup-system.sh run|test
set -euo pipefail

RUN_PACKAGES=(softhsm2 gcc make libc6-dev libp11-kit-dev libssl-dev python3-venv opensc)
TEST_PACKAGES=(caml-crush-server caml-crush-clients p11-kit p11-kit-modules valgrind openssl libnss3-dev
               libnss3 libnss3-tools)

want=("${RUN_PACKAGES[@]}")
if [ "${1:-run}" = "test" ]; then
    want+=("${TEST_PACKAGES[@]}")
fi

missing=()
for pkg in "${want[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: system packages present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
