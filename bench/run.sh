#!/bin/sh
# Install what the benchmarks need, then run them: bash bench/run.sh [--quick] [run.py options]
set -e
cd "$(dirname "$0")/.."
pip install -q . -r bench/requirements.txt
if [ ! -x /usr/sbin/smtp-source ] || [ ! -x /usr/sbin/smtp-sink ]; then
    # smtp-source and smtp-sink ship with Postfix; do not let the install start a mail server.
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix
fi
exec python bench/run.py "$@"
