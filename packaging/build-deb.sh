#!/usr/bin/env bash
# Build the kumo-agent and kumo-controller .debs from this checkout into build/deb/.
# KUMO_DEB_VERSION=0.1.0+1 builds the same tree under a higher version (the upgrade test).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build/deb}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The source tree is what git tracks plus new files not ignored: never .venv or build output.
src=$work/kumo
mkdir -p "$src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$src")
rm -rf "$src/debian" && cp -a "$root/packaging/debian" "$src/debian"

if [ -n "${KUMO_DEB_VERSION:-}" ]; then
    {
        printf 'kumo (%s) unstable; urgency=medium\n\n  * Rebuilt at version %s.\n\n' "$KUMO_DEB_VERSION" "$KUMO_DEB_VERSION"
        printf ' -- Kumo developers <maintainers@users.noreply.r-seed-3286b842.example>  %s\n\n' "$(date -R)"
        cat "$root/packaging/debian/changelog"
    } > "$src/debian/changelog"
fi

# Debian packages build with Debian's own python3, whatever else is first on PATH.
(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
    tail -40 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
mkdir -p "$out"
mv "$work"/*.deb "$out"/
ls "$out"
