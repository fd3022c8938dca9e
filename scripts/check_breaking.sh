#!/usr/bin/env bash
# `buf breaking`: the protos of the work tree against those of a base commit (rules: buf.yaml's
# `breaking` section, FILE). Proto changes must be additive.
#
# The base: $BUF_BREAKING_AGAINST (a commit-ish) if set; else, on main (or detached at main's
# tip), main's previous commit (HEAD~1); else the merge base of HEAD and main (the local branch,
# else origin/main: a `git clone -b BRANCH` has main only as origin/main). A clone with no such
# history (shallow, or one commit) falls back to HEAD~1, and with no HEAD~1 either there is no
# earlier contract to break: it says so and passes.
#
# The base's protos come out of git with `git archive` (works in worktrees, where .git is a file
# that buf's '.git#ref=' input cannot read, and in any clone that has the commit).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}

have() { git rev-parse --verify --quiet "$1^{commit}" >/dev/null; }

base=""
why=""
if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
  base=$BUF_BREAKING_AGAINST; why="BUF_BREAKING_AGAINST"
else
  branch=$(git rev-parse --abbrev-ref HEAD)
  main=""
  for ref in main origin/main; do
    if have "$ref"; then main=$ref; break; fi
  done
  if [ "$branch" = main ] || { [ -n "$main" ] && [ "$(git rev-parse HEAD)" = "$(git rev-parse "$main")" ]; }; then
    if have HEAD~1; then base=HEAD~1; why="main's previous commit"; fi
  elif [ -n "$main" ] && mb=$(git merge-base HEAD "$main" 2>/dev/null); then
    base=$mb; why="merge base with $main"
  elif have HEAD~1; then
    base=HEAD~1; why="no main in this clone: the previous commit"
  fi
fi
if [ -z "$base" ]; then
  echo "buf breaking: no earlier commit in this clone: no earlier contract to compare with"
  exit 0
fi
have "$base" || { echo "buf breaking: base $base is not a commit here" >&2; exit 2; }
sha=$(git rev-parse --short "$base^{commit}")
if ! git cat-file -e "$sha:protos" 2>/dev/null; then
  echo "buf breaking: $sha ($why) has no protos/: nothing to compare with"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
paths=(protos)
git cat-file -e "$sha:buf.yaml" 2>/dev/null && paths+=(buf.yaml)
git archive "$sha" "${paths[@]}" | tar -x -C "$tmp"
echo "buf breaking: against $sha ($why)"
"$BUF" breaking --against "$tmp"
