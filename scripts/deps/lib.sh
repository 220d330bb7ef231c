# Sourced by the scripts in scripts/deps/: apt with retries, and a no-op when already installed.
# The mirror's name has been seen failing to resolve for a while, so every apt call retries.

export DEBIAN_FRONTEND=noninteractive

apt_retry() {
    local i
    for i in 1 2 3 4 5; do
        "$@" && return 0
        echo "apt: attempt $i failed: $*; retrying in $((i * 3)) s" >&2
        sleep $((i * 3))
    done
    return 1
}

# apt_install PKG...: install what is missing, updating the package lists once per boot.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ ! -e /run/kumo-apt-updated ]; then
        apt_retry apt-get update -q && touch /run/kumo-apt-updated
    fi
    apt_retry apt-get install -y -q --no-install-recommends "${missing[@]}"
}
