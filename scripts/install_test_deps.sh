#!/usr/bin/env bash
# The system packages the test suite needs, installed where apt-get is (as root, or with
# passwordless sudo); elsewhere it says what is missing. Used by `make test` (target `deps`)
# and by .ci/run (which needs make itself before it can call `make test`), so the two install
# the same things. Idempotent: nothing is installed when everything is there.
#
#   tool            Debian package   needed by
#   make            make             make test itself
#   git             git              the generated-code check, buf breaking
#   redis-server    redis-server     private Redis servers (fault, TLS, cluster tests; built with TLS)
#   redis-cli       redis-tools      the local Redis Cluster of the cluster tests
#   initdb, pg_ctl  postgresql       the fault suite's private PostgreSQL
#   runuser         util-linux       running PostgreSQL as a non-root user
#   promtool        prometheus       checking and unit-testing deploy/prometheus/alerts.yml
#   buildah         buildah          building the image (tests/integration/test_image.py)
#   debootstrap     debootstrap      the image test's Debian base
#
# INSTALL_TEST_DEPS=0 only reports. Exit status 0 even when something is missing: the checks
# and tests that need it fail and say so (the image test skips without buildah/debootstrap).
set -uo pipefail

declare -A need=(
  [make]=make [git]=git [redis-server]=redis-server [redis-cli]=redis-tools
  [runuser]=util-linux [promtool]=prometheus [buildah]=buildah [debootstrap]=debootstrap
)
missing_pkgs=()
missing_tools=()
for tool in "${!need[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing_tools+=("$tool"); missing_pkgs+=("${need[$tool]}")
  fi
done
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null 2>&1; then
  missing_tools+=(initdb); missing_pkgs+=(postgresql)
fi
if [ ${#missing_pkgs[@]} -eq 0 ]; then
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(none); fi
fi
if [ "${INSTALL_TEST_DEPS:-1}" != 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${as_root[*]:-}" != none ]; then
  echo "test deps: installing ${missing_pkgs[*]} (apt-get)"
  # policy-rc.d: packages with services (prometheus, postgresql, redis) are not started
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${as_root[@]}" chmod +x /usr/sbin/policy-rc.d
    trap '"${as_root[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  "${as_root[@]}" apt-get update -qq \
    && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}" >/dev/null \
    || echo "test deps: apt-get install failed" >&2
  still=()
  for tool in "${missing_tools[@]}"; do
    if [ "$tool" = initdb ]; then compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || still+=(initdb)
    else command -v "$tool" >/dev/null 2>&1 || still+=("$tool"); fi
  done
  missing_tools=("${still[@]}")
  [ ${#missing_tools[@]} -eq 0 ] && exit 0
fi
echo "test deps: MISSING ${missing_tools[*]} (Debian packages: ${missing_pkgs[*]}); install them" \
  "(apt-get needs root or passwordless sudo) or the checks and tests that use them fail" \
  "(the image test is skipped without buildah/debootstrap)" >&2
exit 0
