#!/usr/bin/env bash
# Nightly refresh of an aligned model, safe to run from cron:
#
#   15 2 * * *  /path/to/alignkit/examples/cron-refresh.sh >> /var/log/alignkit-refresh.log 2>&1
#
# - takes a lock, so two refreshes never overlap (a second one exits 0 at once);
# - builds everything into a dated folder  $ROOT/runs/YYYYmmdd-HHMMSS/ ;
# - only when the run finished and its model folder is complete (alignkit.json written last,
#   atomically, by alignkit itself) does it switch the `current` symlink, with an atomic
#   rename, so readers of $ROOT/current never see a half-written model;
# - a failed run leaves `current` where it was, and exits non-zero (cron mails you).
#
# Settings (environment): ROOT (default: ./refresh), PROFILE (demo | demo-tiny: which
# pipeline of examples/Makefile to run), KEEP (how many dated runs to keep, default 7),
# REFRESH_CMD (replace the pipeline by another command that fills $RUN; tests use it).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
ROOT="${ROOT:-$PWD/refresh}"
PROFILE="${PROFILE:-demo}"
KEEP="${KEEP:-7}"
mkdir -p "$ROOT/runs"

exec 9>"$ROOT/.lock"
if ! flock -n 9; then
  echo "$(date -u +%FT%TZ) another refresh holds $ROOT/.lock; nothing to do" >&2
  exit 0
fi

stamp="$(date -u +%Y%m%d-%H%M%S)"
stamp="$stamp-$$"   # unique even for two runs in one second
RUN="$ROOT/runs/$stamp"
export RUN
echo "$(date -u +%FT%TZ) refresh into $RUN" >&2

if [ -n "${REFRESH_CMD:-}" ]; then
  bash -c "$REFRESH_CMD"
else
  make -C "$here" "$PROFILE" OUT="$RUN"
  # demo-tiny writes into its own OUT; normalise the layout
  [ -d "$RUN" ] || { echo "pipeline wrote no $RUN" >&2; exit 1; }
fi

if [ ! -f "$RUN/aligned/alignkit.json" ]; then
  echo "$(date -u +%FT%TZ) run incomplete (no $RUN/aligned/alignkit.json); current unchanged" >&2
  exit 1
fi

# Atomic switch: make the new link under a temp name, then rename it over `current`.
ln -sfn "runs/$stamp" "$ROOT/.current.$$"
mv -T "$ROOT/.current.$$" "$ROOT/current"
echo "$(date -u +%FT%TZ) current -> runs/$stamp" >&2

# Keep the newest $KEEP runs (never the one `current` points at).
ls -1d "$ROOT"/runs/*/ 2>/dev/null | sort | head -n -"$KEEP" | while read -r old; do
  [ "$(readlink -f "$old")" = "$(readlink -f "$ROOT/current")" ] || rm -rf "$old"
done
