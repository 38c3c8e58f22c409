# shellcheck shell=bash
# What the setup scripts of the separate venvs (setup_sglang.sh, setup_trl.sh) share. A script sets TOOL (its
# name in messages), VENV and PY (the venv's python), defines `probe` (exits 0 when the venv is ready), then
# sources this file.

die() { echo "$TOOL: error: $*" >&2; exit 1; }

# reuse_or_create WHAT MIN_MINOR: when the venv passes `probe`, say so, print its python and exit 0; else create
# it (unless it exists) with $NSR_PYTHON (default python3), which must be Python 3.MIN_MINOR or newer.
reuse_or_create() {
  local what=$1 minor=$2 base=${NSR_PYTHON:-python3}
  if [ -x "$PY" ] && probe >/dev/null 2>&1; then
    echo "$TOOL: reusing $VENV ($what)" >&2
    echo "$PY"
    exit 0
  fi
  if [ ! -x "$PY" ]; then
    "$base" -c "import sys; sys.exit(sys.version_info[:2] < (3, $minor))" 2>/dev/null \
      || die "$what needs Python >= 3.$minor ($base is $("$base" -V 2>&1 || echo missing)); set NSR_PYTHON"
    echo "$TOOL: creating $VENV" >&2
    "$base" -m venv "$VENV" || die "could not create the venv $VENV"
    echo '*' > "$VENV/.gitignore"  # the venv keeps itself out of git
  fi
}
