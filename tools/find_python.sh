#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (3.12 preferred: the version megatron-core 0.19.2
# was verified with), or nothing. Order: PATH, then pyenv-installed versions.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for c in python3.12 "$root"/versions/3.12*/bin/python3 python3.13 python3 "$root"/versions/3.1[3-9]*/bin/python3; do
  p=$(command -v "$c" 2>/dev/null) && ok "$p" && { echo "$p"; exit 0; }
done
exit 0
