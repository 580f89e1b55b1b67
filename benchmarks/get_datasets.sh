#!/usr/bin/env bash
# Fetch the data sets used by the benchmarks. Safe to run more than once.
#
#  * Fashion-MNIST from the Debian package dataset-fashion-mnist, installed
#    system-wide into /usr/share/datasets/fashion-mnist.
#  * UCI Letter Recognition (R package mlbench) and Spambase (R package
#    kernlab): the Debian packages r-cran-mlbench and r-cran-kernlab are only
#    downloaded and unpacked into benchmarks/data/deb/root, not installed
#    (installing them would pull in R). The .rda files are read with the
#    Python package rdata.
#  * The Python packages rdata and pandas in the project's virtualenv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEB_DIR="$ROOT/benchmarks/data/deb"
EXTRACT_DIR="$DEB_DIR/root"
FMNIST_DIR=/usr/share/datasets/fashion-mnist
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
    # As root, apt's download sandbox user cannot write into the work tree.
    APT_DL_OPTS=(-o APT::Sandbox::User=root)
else
    SUDO="sudo"
    APT_DL_OPTS=()
fi
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        $SUDO apt-get update
        apt_updated=1
    fi
}

# --- Fashion-MNIST -----------------------------------------------------------
if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: present in $FMNIST_DIR"
else
    echo "Fashion-MNIST: installing dataset-fashion-mnist"
    apt_update
    $SUDO apt-get install -y dataset-fashion-mnist
fi

# --- UCI data sets from the R packages mlbench and kernlab --------------------
mkdir -p "$DEB_DIR" "$EXTRACT_DIR"
for pkg in r-cran-mlbench r-cran-kernlab; do
    if ls "$DEB_DIR/${pkg}"_*.deb >/dev/null 2>&1; then
        echo "$pkg: already downloaded"
    else
        echo "$pkg: downloading"
        apt_update
        # apt-get download writes into the current directory and needs no root.
        (cd "$DEB_DIR" && apt-get download "${APT_DL_OPTS[@]}" "$pkg")
    fi
    deb="$(ls "$DEB_DIR/${pkg}"_*.deb | sort | tail -n 1)"
    stamp="$EXTRACT_DIR/.$(basename "$deb").extracted"
    if [ ! -f "$stamp" ]; then
        dpkg-deb -x "$deb" "$EXTRACT_DIR"
        touch "$stamp"
    fi
done

for f in LetterRecognition.rda spam.rda; do
    found="$(find "$EXTRACT_DIR" -name "$f" -print -quit)"
    if [ -z "$found" ]; then
        echo "error: $f not found under $EXTRACT_DIR" >&2
        exit 1
    fi
    echo "found $found"
done

# --- Python readers -----------------------------------------------------------
if [ -x "$PYTHON" ]; then
    if ! "$PYTHON" -c "import rdata, pandas" >/dev/null 2>&1; then
        "$PYTHON" -m pip install rdata pandas
    fi
    echo "rdata and pandas: available in $PYTHON"
else
    echo "warning: $PYTHON not found; run 'make venv' (rdata and pandas come with the dev extras)" >&2
fi

echo "datasets ready"
