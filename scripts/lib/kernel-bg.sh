# Sourced by scripts/setup.sh and scripts/test.sh: the guest kernel (guest-kernel/build.sh,
# C only, cached; minutes from a clean cache) builds in the background at nice 10, beside
# the Rust builds, filling the cores cargo leaves idle (build scripts, links, the last
# crates of a chain) instead of coming after them.
#   kernel_bg_start      starts it, in a session of its own with an EXIT trap, so that a
#                        failure or an interrupt of the caller ends its make too
#   kernel_bg_wait SAY   waits for it (at once if none was started); if it failed, says
#                        so with the caller's logging function SAY and exits 1
kernel_bg_pid=
kernel_bg_start() {
    setsid nice -n 10 "$(dirname "${BASH_SOURCE[0]}")/../../guest-kernel/build.sh" >/dev/null &
    kernel_bg_pid=$!
    trap '[ -n "$kernel_bg_pid" ] && kill -TERM -- "-$kernel_bg_pid" 2>/dev/null; true' EXIT
}
kernel_bg_wait() {
    local status=0
    [ -n "$kernel_bg_pid" ] || return 0
    wait "$kernel_bg_pid" || status=$?
    kernel_bg_pid=
    ((status == 0)) || { "$1" "the guest kernel build failed (exit $status; its lines above)"; exit 1; }
}
