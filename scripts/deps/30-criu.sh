#!/usr/bin/env bash
# A working criu for the checkpoint plugin and its tests.
#
# Debian 12's criu 3.17 fails on kernels >= 6.13 ("vdso: Unexpected rt vDSO area bounds":
# [vvar] was split into [vvar] + [vvar_vclock]); criu >= 4.1 handles it. Debian 12 has no
# such package, so we build 4.1.1 from Debian trixie's orig tarball (fetched through a
# private apt source list, so the system's sources are never touched) and install it as
# /usr/local/sbin/criu, which precedes /usr/sbin in PATH (lxc-checkpoint finds criu there).
#
# The built binary is cached under $KUMO_CRIU_CACHE, keyed by this recipe's checksum, so a
# second run only copies it back; when an installed criu >= 4.1 already passes `criu check`
# nothing is built at all.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

CRIU_VERSION=4.1.1
CRIU_DEBIAN_VERSION=4.1.1-1
# From trixie's signed Sources index; checked whichever way the tarball arrives.
CRIU_ORIG_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
CRIU_SNAPSHOT=http://snapshot.debian.org/archive/debian/20250801T000000Z
PREFIX_BIN=/usr/local/sbin/criu
RECIPE_KEY=$(sha256sum "$0" | cut -c1-12)
CACHE_ROOT=${KUMO_CRIU_CACHE:-${KUMO_TEST_CACHE:-/var/cache/kumo-test}/criu}
CACHE=$CACHE_ROOT/$CRIU_VERSION-$RECIPE_KEY

BUILD_DEPS=(libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler uuid-dev
    libaio-dev make gcc pkgconf xz-utils curl ca-certificates)
# What the built binary links against, for a machine that gets it from the cache.
RUNTIME_DEPS=(libbsd0 libcap2 libgnutls30 libnet1 libnftables1 libnl-3-200 libprotobuf-c1
    libuuid1 libaio1 iptables)

die() {
    echo "30-criu: $*" >&2
    exit 1
}

# criu_works BIN: true when BIN is criu >= 4.1 and `criu check` passes on this kernel.
criu_works() {
    local bin=$1 version
    [ -x "$bin" ] || return 1
    version=$("$bin" --version 2>/dev/null | awk '/^Version:/{print $2; exit}')
    [ -n "$version" ] || return 1
    # sort -V puts the smaller first: 4.1 must not sort after the installed version.
    [ "$(printf '4.1\n%s\n' "$version" | sort -V | head -1)" = 4.1 ] || return 1
    "$bin" check >/dev/null 2>&1
}

installed=$(command -v criu || true)
if [ -n "$installed" ] && criu_works "$installed"; then
    echo "30-criu: $installed ($("$installed" --version | awk '/^Version:/{print $2}')) passes criu check; nothing to do"
    exit 0
fi
if [ -n "$installed" ]; then
    echo "30-criu: $installed is older than 4.1 or fails 'criu check' here; installing criu $CRIU_VERSION as $PREFIX_BIN"
fi

if [ -x "$CACHE/criu" ]; then
    apt_install "${RUNTIME_DEPS[@]}"
    install -m 0755 "$CACHE/criu" "$PREFIX_BIN"
    if criu_works "$PREFIX_BIN"; then
        echo "30-criu: installed criu $CRIU_VERSION from $CACHE"
        exit 0
    fi
    echo "30-criu: the cached binary in $CACHE fails 'criu check'; rebuilding" >&2
    rm -rf "$CACHE"
fi

apt_install "${BUILD_DEPS[@]}" "${RUNTIME_DEPS[@]}"

WORK=$(mktemp -d /tmp/kumo-criu-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial"

# The machine's own Debian mirror (deb822 or one-line format), else the public one.
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$MIRROR" ] && [ -r /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1 == "deb" && $2 !~ /^\[/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}

tarball=criu_$CRIU_VERSION.orig.tar.xz
tarball_ok() {
    [ -f "$WORK/$tarball" ] && echo "$CRIU_ORIG_SHA256  $WORK/$tarball" | sha256sum --check --status
}

printf 'deb-src %s trixie main\n' "$MIRROR" >"$WORK/apt/sources.list"
APTOPT=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache")
# The orig tarball is hash-checked by apt against the signed Sources index. The .dsc and
# .debian.tar.xz have been seen answering 404 through some mirrors (apt then exits
# non-zero): the orig tarball is all the build needs, so its checksum decides.
if apt_retry apt-get "${APTOPT[@]}" update -q; then
    (cd "$WORK" && apt-get "${APTOPT[@]}" source --download-only "criu=$CRIU_DEBIAN_VERSION") ||
        echo "30-criu: apt-get source exited non-zero; checking whether the orig tarball arrived" >&2
fi
if ! tarball_ok; then
    rm -f "$WORK/$tarball"
    for url in "$MIRROR/pool/main/c/criu/$tarball" "$CRIU_SNAPSHOT/pool/main/c/criu/$tarball"; do
        echo "30-criu: fetching $url"
        curl -fsSL --retry 4 --retry-delay 3 -o "$WORK/$tarball" "$url" && tarball_ok && break
        echo "30-criu: $url failed or did not match sha256 $CRIU_ORIG_SHA256" >&2
        rm -f "$WORK/$tarball"
    done
fi
tarball_ok || die "could not download $tarball with sha256 $CRIU_ORIG_SHA256 from the trixie Sources index, $MIRROR/pool or $CRIU_SNAPSHOT; check network access to the Debian mirror and run again"

tar -xf "$WORK/$tarball" -C "$WORK"
echo "30-criu: building criu $CRIU_VERSION (about 20 s on 2 cores; log in $WORK/build.log)"
if ! make -C "$WORK/criu-$CRIU_VERSION" -j"$(nproc)" criu >"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log" >&2
    trap - EXIT
    die "building criu $CRIU_VERSION failed; the full log is $WORK/build.log"
fi
built=$WORK/criu-$CRIU_VERSION/criu/criu
"$built" --version | grep -q "Version: $CRIU_VERSION" || die "the build produced no criu $CRIU_VERSION binary"

install -m 0755 "$built" "$PREFIX_BIN"
if ! criu_works "$PREFIX_BIN"; then
    "$PREFIX_BIN" check >&2 || true
    die "criu $CRIU_VERSION was built and installed as $PREFIX_BIN but 'criu check' fails on kernel $(uname -r) (output above)"
fi
mkdir -p "$CACHE.tmp"
install -m 0755 "$built" "$CACHE.tmp/criu"
rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
# Builds from older recipes are dead weight once this one works.
find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 ! -name "$(basename "$CACHE")" -exec rm -rf {} +
echo "30-criu: installed criu $CRIU_VERSION as $PREFIX_BIN (cached in $CACHE)"
