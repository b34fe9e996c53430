#!/bin/bash
# Prepare (idempotently) everything ops/e2e needs to boot the real Linux aoe driver in QEMU:
#   host packages: qemu-system-x86, cpio, kmod (depmod/modprobe), e2fsprogs, vblade (for --target debian),
#                  tcpdump (pcaps; optional)
#   guest: Debian's linux-image-amd64 kernel + modules, busybox-static, aoetools, fetched with
#          `apt-get download` and unpacked with `dpkg -x` (never installed on the host), plus the host's
#          mke2fs/e2fsck/dumpe2fs/bash with their shared libraries, in a base initramfs.
# Cache: $E2E_CACHE (default /var/cache/vblade-ha-e2e). FORCE=1 rebuilds. Second and later runs take < 1 s.
# Adapted from ../shared/linux-initiator/prepare-guest.sh; the repo carries its own copy on purpose.
set -e
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || die "run as root (apt-get, namespaces, QEMU taps)"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio     >/dev/null || need+=(cpio)
command -v depmod   >/dev/null || need+=(kmod)
command -v mke2fs   >/dev/null || need+=(e2fsprogs)
command -v debugfs  >/dev/null || need+=(e2fsprogs)
[ -x /usr/sbin/vblade ] || need+=(vblade)
command -v tcpdump  >/dev/null || need+=(tcpdump)
command -v file     >/dev/null || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
    log "installing host packages: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        { log "apt-get install failed; trying apt-get update first"; apt-get update -qq >&2 &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2; } ||
        die "cannot install ${need[*]} (is a Debian mirror reachable?)"
fi

mkdir -p "$E2E_CACHE/debs"
cd "$E2E_CACHE"
if [ -n "$FORCE" ]; then rm -rf kx pkgx initrd-base.cpio.gz kver vmlinuz-*; fi

if [ ! -f kver ]; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    [ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 to a kernel package (run apt-get update?)"
    log "guest kernel package: $kpkg (download only, not installed on the host)"
    (cd debs && apt-get download "$kpkg" busybox-static aoetools 2>&1 | grep -v 'unsandboxed' >&2) ||
        die "apt-get download $kpkg busybox-static aoetools failed"
    rm -rf kx pkgx; mkdir -p kx pkgx
    dpkg -x debs/"$kpkg"_*.deb kx
    for p in debs/busybox-static_*.deb debs/aoetools_*.deb; do dpkg -x "$p" pkgx; done
    kv=$(ls kx/lib/modules | head -1)
    cp "kx/boot/vmlinuz-$kv" "vmlinuz-$kv"
    # the .deb ships no modules.dep; modprobe --show-depends below needs it
    depmod -b kx "$kv"
    echo "$kv" >kver.tmp && mv kver.tmp kver
fi
kv=$(cat kver)

# rebuild the base initramfs whenever the guest/ files changed
if [ -f initrd-base.cpio.gz ] && { [ "$E2E_DIR/guest/init" -nt initrd-base.cpio.gz ] ||
     [ "$E2E_DIR/guest/aoelib.sh" -nt initrd-base.cpio.gz ]; }; then
    log "guest/ changed: rebuilding the base initramfs"; rm -f initrd-base.cpio.gz
fi
if [ ! -f initrd-base.cpio.gz ]; then
    R=$E2E_CACHE/initrd-root
    rm -rf "$R"; mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,root,lib/modules/"$kv",lib64,usr/bin,usr/sbin,lib/x86_64-linux-gnu}
    cp pkgx/bin/busybox "$R/bin/busybox"
    for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
    ln -s ../bin/busybox "$R/sbin/modprobe"    # the kernel's request_module() runs /sbin/modprobe
    # aoe + NIC drivers + ext4 (serves ext2) + crc32c (ext4 asks for it via request_module)
    for m in aoe virtio_net virtio_pci e1000 ext4 crc32c_generic; do
        modprobe -d kx -S "$kv" --show-depends "$m" | awk '/^insmod/{print $2}'
    done | sort -u | while read -r ko; do
        rel=${ko#"$E2E_CACHE"/kx/}
        mkdir -p "$R/$(dirname "$rel")"; cp "$ko" "$R/$rel"
    done
    cp kx/lib/modules/"$kv"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$kv/" 2>/dev/null || true
    depmod -b "$R" "$kv"
    copy_bin() {  # copy_bin SRC DESTDIR : binary + its shared libraries
        cp "$1" "$R/$2/"
        ldd "$1" | awk '/=>/{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
            [ -f "$lib" ] || continue
            mkdir -p "$R/$(dirname "$lib")"; cp -L "$lib" "$R/$lib"
        done
    }
    for b in /sbin/mke2fs /sbin/e2fsck /sbin/dumpe2fs /bin/bash; do
        [ -x "$b" ] && copy_bin "$b" "$(dirname "$b" | sed 's,^/,,')"
    done
    # busybox's own (limited) mke2fs must not shadow the real one
    rm -f "$R/bin/mke2fs"; ln -sf mke2fs "$R/sbin/mkfs.ext2"; ln -sf e2fsck "$R/sbin/fsck.ext2"
    for b in pkgx/sbin/* pkgx/usr/sbin/*; do
        [ -f "$b" ] || continue
        if file -b "$b" | grep -q ELF; then copy_bin "$b" sbin; else cp "$b" "$R/sbin/"; fi
    done
    cp /lib64/ld-linux-x86-64.so.2 "$R/lib64/" 2>/dev/null || true
    cp "$E2E_DIR/guest/init" "$R/init"; chmod +x "$R/init"
    cp "$E2E_DIR/guest/aoelib.sh" "$R/lib/aoelib.sh"
    echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"
    (cd "$R" && find . | cpio -o -H newc --quiet | gzip -6) >initrd-base.cpio.gz.tmp
    mv initrd-base.cpio.gz.tmp initrd-base.cpio.gz
    log "base initramfs: $(du -h initrd-base.cpio.gz | cut -f1)"
fi
log "prepared: $E2E_CACHE/vmlinuz-$kv + initrd-base.cpio.gz"
