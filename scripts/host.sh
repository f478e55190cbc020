# Host preparation shared by the test, demo and CI scripts (sourced, not run).
# glommio locks memory for its io_uring rings and buffers and refuses to start below
# 512 KiB of RLIMIT_MEMLOCK; see tuning/README.md.

host_prepare() {
    # Raise the soft limit as far as the hard limit allows (root with CAP_SYS_RESOURCE
    # may go further; sandboxes often cap the hard limit, 8 MiB is plenty for the tests).
    ulimit -l unlimited 2>/dev/null || ulimit -l "$(ulimit -H -l)" 2>/dev/null || true
    local lim
    lim=$(ulimit -l)
    if [ "$lim" != unlimited ] && [ "$lim" -lt 512 ]; then
        echo "error: locked-memory limit is ${lim} KiB; glommio needs at least 512 KiB per process." >&2
        echo "       Raise it: as root 'ulimit -l unlimited', or a 'memlock' line in /etc/security/limits.conf." >&2
        exit 1
    fi
    echo "host: memlock ${lim} KiB, kernel $(uname -r)"
    if [ -r /proc/sys/kernel/io_uring_disabled ] && [ "$(cat /proc/sys/kernel/io_uring_disabled)" != 0 ]; then
        echo "error: io_uring is disabled (kernel.io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled)); set it to 0." >&2
        exit 1
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install the Rust toolchain (rustup)." >&2
        exit 1
    fi
}
