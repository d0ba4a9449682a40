# Sourced by the benchmark scripts before they change into the checkout: from_caller PATH prints
# PATH as the caller meant it, relative to the folder the script was started in, so that the cd
# does not move it. An empty PATH stays empty, for the script's default (the checkout's).
CALLER_DIR=$PWD
from_caller() { case "$1" in /* | "") printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER_DIR" "$1" ;; esac; }
