#!/usr/bin/env bash
# Build the echo-agent image from Debian's busybox-static without a registry, and write it as
# a `docker save` tarball plus the tarball's SHA-256 digest, the form the runner downloads.
#
# Usage: build.sh [OUT_DIR]    (default: the dist folder next to this script)
#
# Writes OUT_DIR/echo-agent.tar and OUT_DIR/echo-agent.digest ("sha256:<64 hex digits>"), then
# removes the image from Docker so that the runner has to load it from the tarball. The image
# is saved by ID, so the tarball has no repository tags. check.sh runs the result.
#
# The image's root filesystem is /bin/busybox with one symlink per applet, plus the files
# under files/. The runner starts it as user 65534:65534 with a read-only root filesystem and
# no capabilities, and sets net.ipv4.ip_unprivileged_port_start=0 so that port 80 works.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_DIR=${1:-$HERE/dist}
BUSYBOX=/bin/busybox

IMAGE_CHANGES=(
    --change 'ENTRYPOINT ["/entrypoint.sh"]'
    --change 'WORKDIR /'
    --change 'EXPOSE 80'
    --change 'USER 65534:65534'
    --change 'ENV PATH=/bin'
)

die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

rootfs=""
image_id=""
cleanup() {
    if [[ -n "$rootfs" ]]; then
        rm -rf "$rootfs"
    fi
    if [[ -n "$image_id" ]]; then
        docker rmi "$image_id" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# Copy the agent's files into the root filesystem. Scripts (files starting with "#!") get mode
# 755 and everything else 644, whatever the checkout's modes are, so the image does not depend
# on the umask or on how git restored the executable bits.
copy_agent_files() {
    local source relative target
    while IFS= read -r -d '' source; do
        relative=${source#"$HERE/files/"}
        target="$rootfs/$relative"
        mkdir -p "$(dirname "$target")"
        # --remove-destination replaces an applet link such as bin/sh instead of writing
        # through it into /bin/busybox.
        cp --remove-destination "$source" "$target"
        if [[ "$(head -c 2 "$source")" == '#!' ]]; then
            chmod 755 "$target"
        else
            chmod 644 "$target"
        fi
    done < <(find "$HERE/files" -type f -print0)
}

main() {
    local applet tarball digest_file digest
    umask 022
    if [[ ! -x "$BUSYBOX" ]]; then
        die "$BUSYBOX not found; install it with: apt-get install busybox-static"
    fi
    # ldd fails on a static binary. The dynamically linked busybox package would not run in
    # an image that has no C library.
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        die "$BUSYBOX is dynamically linked; install the static build with: apt-get install busybox-static"
    fi

    rootfs=$(mktemp -d)
    chmod 755 "$rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/dev" "$rootfs/etc" "$rootfs/proc" "$rootfs/sys"
    cp "$BUSYBOX" "$rootfs/bin/busybox"
    chmod 755 "$rootfs/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        # --list names busybox itself too, and a link would replace the binary.
        if [[ "$applet" != busybox ]]; then
            ln -s busybox "$rootfs/bin/$applet"
        fi
    done
    copy_agent_files

    # Without a repository argument, docker import leaves the image untagged.
    image_id=$(tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . |
        docker import "${IMAGE_CHANGES[@]}" -) || die "docker import failed"
    [[ "$image_id" == sha256:* ]] || die "docker import returned ${image_id@Q}, expected an image ID"

    mkdir -p "$OUT_DIR"
    tarball="$OUT_DIR/echo-agent.tar"
    digest_file="$OUT_DIR/echo-agent.digest"
    docker save -o "$tarball.tmp" "$image_id"
    # docker save -o creates the file with mode 600, which a file server running under its
    # own user cannot read.
    chmod 644 "$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    digest="sha256:$(sha256sum "$tarball" | cut -d ' ' -f 1)"
    echo "$digest" >"$digest_file"

    docker rmi "$image_id" >/dev/null
    image_id=""
    echo "tarball: $tarball"
    echo "digest: $digest"
}

main "$@"
