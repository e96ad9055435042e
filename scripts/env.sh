# Sourced by the scripts: one shared target directory outside the clone, so a fresh clone
# reuses what an earlier build made and the C/C++ dependencies build once (see .ci/run).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cdp/target}"
export CDP_BIN_DIR="$CARGO_TARGET_DIR/debug"
