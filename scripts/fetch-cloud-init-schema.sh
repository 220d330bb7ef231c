#!/usr/bin/env bash
# Refresh the cloud-config JSON schema the SDK validates seeds against (agent/sdk/cloudconfig)
# (agent/sdk/cloudconfig/schemas/) from Debian 12's cloud-init package: the same cloud-init the
# Debian image (scripts/build-image.sh) runs, so a seed Kumo accepts is one that guest reads.
# apt verifies the package against the archive's signed index; only the schema and the
# package's copyright file are taken (the schema is data: nothing of cloud-init's code is).
# Run it when Debian updates cloud-init, then commit what changed.
set -euo pipefail
. "$(dirname "$0")/deps/lib.sh"
dest=$(cd "$(dirname "$0")/../agent/sdk/cloudconfig/schemas" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt
(cd "$work" && apt_retry apt-get download -q -o APT::Sandbox::User=root cloud-init)
deb=$(ls "$work"/cloud-init_*.deb)
dpkg-deb -x "$deb" "$work/x"
cp "$work/x/usr/lib/python3/dist-packages/cloudinit/config/schemas/schema-cloud-config-v1.json" "$dest/"
cp "$work/x/usr/share/doc/cloud-init/copyright" "$dest/copyright"
version=$(dpkg-deb -f "$deb" Version)
sha=$(sha256sum "$dest/schema-cloud-config-v1.json" | cut -d' ' -f1)
cat > "$dest/SOURCE" <<SOURCE
schema-cloud-config-v1.json: from Debian's cloud-init $version (bookworm),
/usr/lib/python3/dist-packages/cloudinit/config/schemas/, sha256 $sha.
Licence: GPL-3 or Apache-2.0 (cloud-init's dual licence, see copyright); Kumo uses it
under Apache-2.0. Refreshed by scripts/fetch-cloud-init-schema.sh.
SOURCE
echo "cloud-init $version schema -> $dest"
