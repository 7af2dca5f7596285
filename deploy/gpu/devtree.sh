#!/usr/bin/env bash
# hide | restore: keep results/ and the shipped PCA bases (common/data/basis-*.safetensors, 50 MB together) out
# of the working tree that a device call sends (64 MiB in all, /work/.library/device/README.md), and put them
# back. `hide` untracks them in the index and ignores them in .git/info/exclude; `restore` undoes both. Run
# `restore` right after the device calls: until then `git status` shows them as deleted.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
paths=(results $(git ls-files 'common/data/basis-*.safetensors'))
case "${1:-}" in
hide)
  git rm -r -q --cached "${paths[@]}"
  printf '/%s\n' "${paths[@]}" >> .git/info/exclude
  ;;
restore)
  hidden=$(grep -E '^/(results|common/data/basis-.*\.safetensors)$' .git/info/exclude | sed 's#^/##' || true)
  [ -z "$hidden" ] || git reset -q -- $hidden
  sed -i -E '\#^/(results|common/data/basis-.*\.safetensors)$#d' .git/info/exclude
  ;;
*)
  sed -n '2,5p' "$0" >&2
  exit 2
  ;;
esac
