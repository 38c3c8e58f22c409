# shellcheck shell=bash
# What the setup scripts share. A script sets TOOL (its name in messages), VENV and PY (the venv's python) and
# VENV_VARIABLE (the environment variable that moves the venv); setup_sglang.sh and setup_trl.sh, for the separate
# venvs, also set LOG and define `probe` (exits 0 when the venv is ready). Then it sources this file.

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

# free_mib DIR: MiB free on the filesystem that holds DIR (or its nearest existing parent).
free_mib() {
  local dir=$1
  while [ ! -e "$dir" ] && [ "$dir" != / ]; do dir=$(dirname "$dir"); done
  df -Pm "$dir" 2>/dev/null | awk 'NR == 2 {print $4}'
}

# check_space NEED_MIB: warn, before a long install, when the venv's disk or pip's temporary directory has less
# than NEED_MIB free (the estimate can be high: wheels already on local disk need no temporary copy).
check_space() {
  local need=$1 dir free
  for dir in "$VENV" "${TMPDIR:-/tmp}"; do
    free=$(free_mib "$dir")
    if [ -n "$free" ] && [ "$free" -lt "$need" ]; then
      echo "$TOOL: warning: $dir has $free MiB free and this install may need about $need MiB" \
           "(the venv plus the wheels pip downloads); it may run out of space" >&2
    fi
  done
}

# venv_pip_install WHAT PIP_ARGS...: pip install into $PY, logging to $LOG. No download cache: the wheels would
# be kept twice (cache and venv), and a CUDA build of torch is several GB. Dies with the log's tail, and with
# the free space and what to do when the disk filled up.
venv_pip_install() {
  local what=$1; shift
  echo "$TOOL: installing $what" >&2
  if ! "$PY" -m pip install --disable-pip-version-check --no-input --no-cache-dir "$@" >>"$LOG" 2>&1; then
    tail -n 15 "$LOG" >&2
    if grep -q "No space left on device" "$LOG" 2>/dev/null; then
      die "out of disk space installing $what: $VENV has $(free_mib "$VENV") MiB free and pip's temporary" \
          "directory ${TMPDIR:-/tmp} $(free_mib "${TMPDIR:-/tmp}") MiB. Free some space, or put the venv" \
          "($VENV_VARIABLE) or TMPDIR on a larger disk, and run this again (full pip log: $LOG)"
    fi
    die "could not install $what (full pip log: $LOG)"
  fi
}

# torch_cpu_index: print the PyTorch CPU wheel index ($NSR_TORCH_CPU_INDEX, default PyTorch's own) when it is
# reachable, else nothing (then pip's configured indexes and find-links are used).
torch_cpu_index() {
  local url=${NSR_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu} python=${1:-python3}
  if "$python" - "$url" >/dev/null 2>&1 <<'PYEOF'
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=3)
PYEOF
  then
    echo "$url"
  fi
}
