#!/usr/bin/env bash
# Ansible for tests/hosts.rs and for linting ansible/: a virtualenv with the `ansible` package (ansible-core
# plus the community collections it bundles: community.docker for the docker connection, ansible.posix) and
# ansible-lint, from PyPI. Cached in ~/.cache/meshd/ansible-venv (MESHD_CACHE) and rebuilt only when the pins
# below change. Prints the venv's bin directory.
#   bash tests/hosts/ansible-venv.sh             # → /root/.cache/meshd/ansible-venv/bin
#   "$(bash tests/hosts/ansible-venv.sh)/ansible-lint" ansible/
set -euo pipefail
pins="ansible==11.13.0 ansible-lint==25.12.2"
venv="${MESHD_CACHE:-$HOME/.cache/meshd}/ansible-venv"
stamp="$venv/.meshd-pins"

if [ -x "$venv/bin/ansible-playbook" ] && [ -x "$venv/bin/ansible-lint" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$pins" ]; then
  echo "$venv/bin"
  exit 0
fi
python="${PYTHON:-python3}"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
if ! "$python" -m venv "$venv" >&2; then
  rm -rf "$venv"
  echo "ansible-venv.sh: $python cannot make a virtualenv (on Debian: apt-get install python3-venv)" >&2
  exit 1
fi
# shellcheck disable=SC2086 # the pins are separate words
"$venv/bin/pip" install --quiet --disable-pip-version-check $pins >&2
printf '%s' "$pins" >"$stamp"
echo "$venv/bin"
