#!/usr/bin/env bash
# System packages lsa uses beyond Python, from Debian's archive (idempotent):
#   - a CJK font (fonts-wqy-microhei) so Chinese tokens render in figures; best effort:
#     without root or apt it warns and carries on (figures then show boxes for Chinese);
#   - with --browser: Debian's Chromium and the Playwright driver for tests/test_browser.py
#     (required: fails loudly when it cannot install them).
# Usage: scripts/install_system.sh [--browser] [python]   (python default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
BROWSER=0
if [ "${1:-}" = "--browser" ]; then BROWSER=1; shift; fi
PY="${1:-.venv/bin/python}"
PLAYWRIGHT_VERSION=1.65.2

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
updated=0
apt_install() {
    if [ "$updated" -eq 0 ]; then $SUDO apt-get update -q >/dev/null; updated=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@" >/dev/null
}

if ! fc-list 2>/dev/null | grep -qiE 'WenQuanYi|Noto Sans CJK|Source Han Sans'; then
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
        apt_install fonts-wqy-microhei fontconfig || echo "warning: could not install a CJK font; Chinese labels in figures will show boxes" >&2
        rm -f "$HOME"/.cache/matplotlib/fontlist-*.json
    else
        echo "warning: no CJK font found and no apt-get as root; Chinese labels in figures will show boxes" >&2
    fi
fi

if [ "$BROWSER" -eq 1 ]; then
    if [ ! -x /usr/bin/chromium ]; then
        apt_install chromium
    fi
    if ! "$PY" -c "import importlib.metadata as m; assert m.version('playwright') == '$PLAYWRIGHT_VERSION'" 2>/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION"
    fi
    /usr/bin/chromium --version
fi
