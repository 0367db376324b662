#!/usr/bin/env bash
# One-time, idempotent setup for the OHIF viewer test (tests/integration/test_ohif_viewer.py):
#   * Debian's chromium (apt-get; sudo only when not root),
#   * OHIF's prebuilt viewer: the dist/ of npm @ohif/app (exact version, checked),
#   * puppeteer-core (exact version) to drive Chromium from node.
# Everything npm fetches goes into one cache folder (first argument, or
# ${SEGAPP_TEST_CACHE:-$HOME/.cache/segapp-test}/ohif). A second run only checks and prints.
# Prints what it did; on a failure, exits non-zero with one line "ohif setup: ..." on stderr:
# 3 when Chromium cannot be installed or started here, 1 for anything else (npm, cache folder).
# The last lines are key=value (chromium=, ohif_dist=, node_modules=) for callers.
set -uo pipefail

OHIF_VERSION=3.13.2
# puppeteer-core 24.43.1: the last release that runs on Node 18/20 (25.x needs Node >= 22.12);
# it speaks CDP, which Chromium 156 serves (checked by the test itself).
PUPPETEER_CORE_VERSION=24.43.1
CACHE="${1:-${SEGAPP_TEST_CACHE:-$HOME/.cache/segapp-test}/ohif}"

fail() { echo "ohif setup: $*" >&2; exit 1; }
fail_chromium() { echo "ohif setup: $*" >&2; exit 3; }
say() { echo "ohif setup: $*"; }

# --- Chromium ---------------------------------------------------------------------------------
chromium_bin() { command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null || true; }
CHROMIUM="${SEGAPP_CHROMIUM:-$(chromium_bin)}"
if [ -z "$CHROMIUM" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail_chromium "chromium is missing and neither root nor sudo is available to apt-get install it"
    SUDO="sudo -n"
  fi
  command -v apt-get >/dev/null 2>&1 || fail_chromium "chromium is missing and apt-get is not available to install it"
  say "installing Debian's chromium (apt-get)"
  t0=$SECONDS
  log="$(mktemp)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core; } >"$log" 2>&1; then
    tail -5 "$log" >&2; rm -f "$log"
    fail_chromium "apt-get install chromium failed (see the lines above)"
  fi
  rm -f "$log"
  CHROMIUM="$(chromium_bin)"
  [ -n "$CHROMIUM" ] || fail_chromium "apt-get installed chromium but no chromium binary is on PATH"
  say "installed chromium in $((SECONDS - t0)) s"
else
  say "chromium present: $CHROMIUM"
fi
version="$("$CHROMIUM" --headless --no-sandbox --version 2>/dev/null | head -1)"
[ -n "$version" ] || fail_chromium "$CHROMIUM does not start (--version printed nothing)"
say "$version"
# A real headless start (not just --version): what the test needs from it.
timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --dump-dom about:blank \
  >/dev/null 2>&1 || fail_chromium "$CHROMIUM does not start headless (--dump-dom about:blank failed)"

# --- npm packages -----------------------------------------------------------------------------
command -v npm >/dev/null 2>&1 || fail "npm is missing (install nodejs + npm)"
command -v node >/dev/null 2>&1 || fail "node is missing (install nodejs)"
mkdir -p "$CACHE" || fail "cannot create the cache folder $CACHE"

pkg_version() { node -e 'try{console.log(require(process.argv[1]).version)}catch(e){}' "$1" 2>/dev/null; }

APP="$CACHE/ohif-app-$OHIF_VERSION"
if [ "$(pkg_version "$APP/package.json")" = "$OHIF_VERSION" ] && [ -f "$APP/dist/index.html" ]; then
  say "@ohif/app $OHIF_VERSION present: $APP/dist"
else
  say "fetching @ohif/app@$OHIF_VERSION (npm pack, about 200 MB unpacked)"
  t0=$SECONDS
  tmp="$(mktemp -d "$CACHE/.pack.XXXXXX")" || fail "cannot make a temporary folder in $CACHE"
  tgz="$(cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" 2>"$tmp/npm.err" | tail -1)"
  if [ -z "$tgz" ] || [ ! -f "$tmp/$tgz" ]; then
    tail -3 "$tmp/npm.err" >&2; rm -rf "$tmp"
    fail "npm pack @ohif/app@$OHIF_VERSION failed (see the lines above)"
  fi
  mkdir -p "$tmp/x" && tar -xzf "$tmp/$tgz" -C "$tmp/x" || { rm -rf "$tmp"; fail "cannot unpack $tgz"; }
  got="$(pkg_version "$tmp/x/package/package.json")"
  [ "$got" = "$OHIF_VERSION" ] || { rm -rf "$tmp"; fail "npm gave @ohif/app $got, expected $OHIF_VERSION"; }
  [ -f "$tmp/x/package/dist/index.html" ] || { rm -rf "$tmp"; fail "@ohif/app $OHIF_VERSION has no dist/index.html"; }
  rm -rf "$APP" && mv "$tmp/x/package" "$APP" && rm -rf "$tmp" || fail "cannot move OHIF into $APP"
  say "unpacked @ohif/app $OHIF_VERSION in $((SECONDS - t0)) s: $APP/dist"
fi

PPC="$CACHE/node_modules/puppeteer-core"
if [ "$(pkg_version "$PPC/package.json")" = "$PUPPETEER_CORE_VERSION" ]; then
  say "puppeteer-core $PUPPETEER_CORE_VERSION present"
else
  say "installing puppeteer-core@$PUPPETEER_CORE_VERSION"
  t0=$SECONDS
  log="$(mktemp)"
  if ! npm install --no-save --no-audit --no-fund --no-package-lock --prefix "$CACHE" \
      "puppeteer-core@$PUPPETEER_CORE_VERSION" >"$log" 2>&1; then
    tail -3 "$log" >&2; rm -f "$log"
    fail "npm install puppeteer-core@$PUPPETEER_CORE_VERSION failed (see the lines above)"
  fi
  rm -f "$log"
  got="$(pkg_version "$PPC/package.json")"
  [ "$got" = "$PUPPETEER_CORE_VERSION" ] || fail "npm installed puppeteer-core $got, expected $PUPPETEER_CORE_VERSION"
  say "installed puppeteer-core $PUPPETEER_CORE_VERSION in $((SECONDS - t0)) s"
fi

echo "chromium=$CHROMIUM"
echo "ohif_dist=$APP/dist"
echo "node_modules=$CACHE/node_modules"
