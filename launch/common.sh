# shellcheck shell=bash
# Sourced by the launch scripts. Under --dry-run (their first argument) `run` prints each command instead
# of running it, quoted so it can be pasted into a shell.
DRY_RUN=0

quote() {  # the arguments as one shell line: single quotes around any that need them
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    "$@"
  fi
}

usage() {
  echo "usage: $1" >&2
  exit 2
}
