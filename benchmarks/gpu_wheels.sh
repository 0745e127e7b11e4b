#!/usr/bin/env bash
# The wheels benchmarks/gpu.py needs on a machine that has Python, torch, numpy and pyyaml only
# (and can fetch nothing): FunASR and what `funasr.models.emotion2vec.model` imports
# (omegaconf, antlr4, kaldiio, librosa, lazy_loader), and pydantic for serve_app.config.
# Versions are those the project runs on. Written to .whl/ at the repository root (git-ignored),
# about 4.2 MiB; then the whole command for that machine is printed.
#
#   bash benchmarks/gpu_wheels.sh                                 # CPython 3.12, x86-64 Linux
#   PYTHON_VERSION=3.11 WHEEL_DIR=/tmp/w bash benchmarks/gpu_wheels.sh   # a local check
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
dest=${WHEEL_DIR:-.whl}
py=${PYTHON_VERSION:-3.12}
pip=(python3 -m pip)

PURE=(funasr==1.4.16 omegaconf==2.3.1 kaldiio==2.18.1 librosa==0.11.0 lazy-loader==0.6
      pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0)  # pydantic needs >=4.16: carried, whatever the machine has
BINARY=(pydantic-core==2.50.5)
# omegaconf pins antlr4-python3-runtime 4.9.*, which is published as source only: built here
# (pure Python, so the wheel fits any Python 3).
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)

if [[ $dest == .whl ]] && ! git check-ignore -q .whl/; then
  echo "add /.whl/ to .gitignore or .git/info/exclude first: the wheels must not be committed" >&2
  exit 1
fi
rm -rf "$dest"
mkdir -p "$dest"
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" "${PURE[@]}" "${BINARY[@]}"
"${pip[@]}" wheel -q --no-deps --no-binary=:all: -w "$dest" "${SOURCE_ONLY[@]}"

count=$(ls "$dest"/*.whl | wc -l)
expected=$(( ${#PURE[@]} + ${#BINARY[@]} + ${#SOURCE_ONLY[@]} ))
if (( count != expected )); then
  echo "expected $expected wheels in $dest, found $count:" >&2
  ls "$dest" >&2
  exit 1
fi
wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
limit=$(( ${MAX_COPY_MIB:-64} * 1024 * 1024 ))  # what is copied to the GPU machine stays small
echo "$count wheels in $dest: $(( wheels / 1024 )) KiB; with the working tree ($(( tree / 1024 )) KiB)" \
     "$(( (wheels + tree) * 100 / limit ))% of MAX_COPY_MIB (${MAX_COPY_MIB:-64} MiB)"
(( wheels + tree < limit )) || { echo "wheels and tree exceed MAX_COPY_MIB" >&2; exit 1; }
cat <<'EOF'
On the GPU machine, from the repository root, with .whl carried (under 8 minutes on one H100):
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 -m benchmarks.gpu --device cuda --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
EOF
