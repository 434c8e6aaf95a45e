#!/bin/sh
# System packages the slow tests and `make screenshot` need, from Debian's archive:
#   chromium                 headless browser for the dashboard test and bench/screenshot.py
#   prometheus-alertmanager  the real Alertmanager (and amtool) for the webhook end-to-end test
# Idempotent: exits at once when every command is already on PATH.
set -eu

PATH="$PATH:/usr/sbin:/usr/bin"
missing=""
for cmd in chromium amtool prometheus-alertmanager; do
    command -v "$cmd" >/dev/null 2>&1 || missing="$missing $cmd"
done
[ -z "$missing" ] && exit 0

echo "system-deps: missing:$missing; installing chromium prometheus-alertmanager" >&2
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "system-deps: not root and no sudo; install chromium prometheus-alertmanager" >&2
    exit 1
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends chromium prometheus-alertmanager
