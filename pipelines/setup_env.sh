#!/usr/bin/env bash
# Create or reuse .venv in the clone and install everything the project needs.
# Idempotent: a second run on a ready .venv only checks and returns (seconds).
#
#   bash pipelines/setup_env.sh                 # .venv in the repository root
#   bash pipelines/setup_env.sh --detectron2-only --python "$(which python)"
#                                               # (conda users) add Detectron2 to an existing env
#
# Versions are pinned in one place: requirements.lock (also used by environment.yml).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LXMERT_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements.lock"
BASE_PYTHON="${PYTHON:-}"
D2_ONLY=0
TARGET_PY=""
D2_VERSION="0.7.2"
D2_SHA256="491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"

while [ $# -gt 0 ]; do
  case "$1" in
    --detectron2-only) D2_ONLY=1 ;;
    --python) TARGET_PY="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup_env.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

STEP="start"
# pip, quiet, without the local mirror's "Location ... is ignored" chatter; its errors still show.
pip_q() {
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  printf '%s\n' "$out" | grep -v -e "is ignored: it is neither a file nor a directory" -e '^$' >&2 || true
  return $rc
}
say() { echo "[setup_env] $*"; }
trap 'rc=$?; echo "[setup_env] FAILED at step: ${STEP} (exit ${rc}). Fix the cause above and run the script again; finished steps are kept." >&2; exit $rc' ERR

# pip on this kind of machine may look into a local wheel folder holding a CPU-only torch 2.13
# that no torchvision build loads on: never let it in, the lock pins the registry builds.
export PIP_FIND_LINKS=""
export PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------------------------------------
# Detectron2: reuse an importable one, otherwise build a pure-Python wheel from sal-detectron2.
# ---------------------------------------------------------------------------------------------
install_detectron2() {
  local py="$1" cache="$2"
  STEP="detectron2: look for an importable detectron2"
  if "$py" -c "import detectron2" 2>/dev/null; then
    say "detectron2 already importable in $("$py" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))'): kept"
    return 0
  fi
  # A GPU user who built Detectron2 from source into the base interpreter: link it into the venv.
  if [ -n "$BASE_PYTHON_RESOLVED" ] && [ "$py" != "$BASE_PYTHON_RESOLVED" ] \
     && "$BASE_PYTHON_RESOLVED" -c "import detectron2" 2>/dev/null; then
    local d2parent site
    d2parent="$("$BASE_PYTHON_RESOLVED" -c 'import detectron2,os;print(os.path.dirname(os.path.dirname(detectron2.__file__)))')"
    site="$("$py" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
    echo "import sys; sys.path.append('$d2parent')" > "$site/_external_detectron2.pth"
    if "$py" -c "import detectron2" 2>/dev/null; then
      say "detectron2 found in the base interpreter ($d2parent): linked into the venv"
      return 0
    fi
    rm -f "$site/_external_detectron2.pth"
  fi
  mkdir -p "$cache"
  local built="$cache/sal_detectron2-${D2_VERSION}-py3-none-any.whl"
  if [ ! -f "$built" ]; then
    local work; work="$(mktemp -d)"
    STEP="detectron2: download sal-detectron2==${D2_VERSION}"
    say "downloading sal-detectron2==${D2_VERSION} (CPython 3.10 wheel holding Detectron2's Python source)"
    pip_q "$py" -m pip download -q --no-deps --python-version 3.10 --only-binary=:all: \
      "sal-detectron2==${D2_VERSION}" -d "$work/dl"
    local whl; whl="$(ls "$work"/dl/sal_detectron2-*.whl)"
    STEP="detectron2: check sha256 of $(basename "$whl")"
    local got; got="$(sha256sum "$whl" | cut -d' ' -f1)"
    if [ "$got" != "$D2_SHA256" ]; then
      echo "[setup_env] sha256 mismatch for $whl: got $got, expected $D2_SHA256" >&2
      false
    fi
    STEP="detectron2: unpack and make it pure Python"
    "$py" -m wheel unpack "$whl" -d "$work/un" >/dev/null
    local root; root="$(ls -d "$work"/un/sal_detectron2-*)"
    rm -f "$root"/detectron2/_C.cpython-*.so
    cat > "$root/detectron2/_C.py" <<'PYEOF'
"""Stand-in for Detectron2's compiled extension, which this pure-Python build does not carry.

The LXMERT extractor needs only torchvision's ops (nms, RoIPool). Anything that asks for a
Detectron2 C++/CUDA op gets an AttributeError naming it; build Detectron2 from source to have it.
"""


def __getattr__(name: str):
    raise AttributeError(
        f"detectron2._C.{name} is a compiled Detectron2 op that this pure-Python install does not "
        "provide; install Detectron2 from source (it is then used instead) to get it."
    )
PYEOF
    local wheelfile; wheelfile="$(ls "$root"/*.dist-info/WHEEL)"
    sed -i -e 's/^Root-Is-Purelib:.*/Root-Is-Purelib: true/' -e 's/^Tag:.*/Tag: py3-none-any/' "$wheelfile"
    # drop the RECORD line of the removed .so so the repacked wheel's RECORD is consistent
    sed -i -e '/_C\.cpython-.*\.so/d' "$(ls "$root"/*.dist-info/RECORD)"
    STEP="detectron2: repack as py3-none-any"
    mkdir -p "$work/out"
    "$py" -m wheel pack "$root" -d "$work/out" >/dev/null
    mv "$(ls "$work"/out/*.whl)" "$built"
    rm -rf "$work"
    say "built $built"
  else
    say "using cached $built"
  fi
  STEP="detectron2: install $(basename "$built")"
  pip_q "$py" -m pip install -q --no-deps --force-reinstall "$built"
  STEP="detectron2: import check"
  "$py" -W ignore::FutureWarning -c "import detectron2.modeling, detectron2.config"
  say "detectron2 installed (pure Python, torchvision ops)"
}

# the interpreter that creates the venv
if [ -z "$BASE_PYTHON" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then BASE_PYTHON="$cand"; break; fi
  done
fi
BASE_PYTHON_RESOLVED="$(command -v "$BASE_PYTHON" || true)"

if [ "$D2_ONLY" = 1 ]; then
  py="${TARGET_PY:-$BASE_PYTHON_RESOLVED}"
  BASE_PYTHON_RESOLVED=""
  install_detectron2 "$py" "$("$py" -c 'import sys;print(sys.prefix)')/.detectron2-wheel"
  exit 0
fi

STEP="python version check"
ver="$("$BASE_PYTHON" -c 'import sys;print("%d.%d"%sys.version_info[:2])')"
if [ "$ver" != "3.11" ]; then
  say "warning: $BASE_PYTHON is Python $ver; the lock file was made for Python 3.11"
fi

PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  STEP="create virtual environment $VENV"
  say "creating $VENV with $BASE_PYTHON ($ver)"
  "$BASE_PYTHON" -m venv "$VENV"
else
  say "reusing $VENV"
fi

# Fast path: nothing changed since the last successful run.
STAMP="$VENV/.lxmert-setup.stamp"
want="$(cat "$LOCK" "$ROOT/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$PY" -c "import importlib.metadata as m, torch, torchvision, detectron2, lmdb, transformers; m.version('lxmert-pipeline')" 2>/dev/null; then
  say "environment up to date ($VENV); nothing to do"
  exit 0
fi
rm -f "$STAMP"

STEP="pip install pinned dependencies (requirements.lock)"
say "installing pinned dependencies from requirements.lock (first run downloads torch's CUDA build: several GB)"
pip_q "$PY" -m pip install -q -r "$LOCK"

STEP="pip install -e . (the project and its console scripts)"
say "installing the project in editable mode"
pip_q "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"

install_detectron2 "$PY" "$VENV/.detectron2-wheel"

STEP="final import check"
"$PY" -W ignore::FutureWarning - <<'PYEOF'
import torch, torchvision, detectron2, lmdb, transformers
print(f"[setup_env] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, detectron2 {detectron2.__version__}, "
      f"transformers {transformers.__version__}, lmdb {lmdb.__version__}")
PYEOF
echo "$want" > "$STAMP"
say "done: activate with 'source $VENV/bin/activate'"
