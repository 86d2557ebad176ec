#!/usr/bin/env bash
# The main job: install what is missing, build, and run the comparison on the built-in
# sample image and guest kernel:
#   1. `nestor bench --quick` on this host (every mode; VM modes are measured when KVM
#      here boots a Linux guest, else reported skipped with the reason);
#   2. when KVM here cannot boot a guest (kvm-pvm: no VT-x/AMD-V), the same bench again
#      inside the KVM test host (tests/testhost/run), where every mode runs; its timings
#      are TCG timings, comparable only within that run.
# Both Markdown reports go to stdout; JSON and SVG plots into the output directory,
# whose absolute path is the LAST line of stdout. Progress on stderr.
#
#   scripts/compare.sh [nestor bench args...]     e.g. --modes process,container,vm
# Step 2 boots the test host once per mode (a boot that dies, or whose modes all come out
# skipped, is retried once; a mode whose boot died twice alone is reported as failed),
# and once more for each VM-container mode's state-transfer section (one round);
# vm-container's fs section (the shared directory over virtio-fs and virtio-blk: 4 VM
# launches) gets one with two vCPUs (a VM's file server runs beside its vCPU, as on any
# host with more than one core); process and container share one boot (their disk
# workloads then write one file), which runs their fs rows with their other sections;
# each VM-container mode's services get a boot of their own too. Up to two boots run at
# once where there are two cores (a test host has one vCPU unless told), longest first,
# their progress lines prefixed with the job. It merges the reports (`nestor bench
# --merge`); each bench rewrites its JSON after every mode, so a cut run keeps its rows.
# Env: NESTOR_COMPARE_OUT (default <repo>/target/compare), NESTOR_COMPARE_TESTHOST=0 to
# skip step 2, NESTOR_COMPARE_TESTHOST_ARGS (default "--runs 3 --density-max 3"),
# NESTOR_COMPARE_TESTHOST_TIMEOUT (seconds per boot, default 900), NESTOR_COMPARE_JOBS
# (test-host boots at once; default 2 with two cores or more, else 1),
# NESTOR_COMPARE_STALL (seconds a boot may print nothing before it is ended as frozen
# and retried; default 240: the longest quiet stretch of a sound boot was 106-122 s).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
log() { echo "compare: $*" >&2; }
# The --modes list among the bench arguments (default: every mode).
modes_of() {
    local m=process,container,vm,vm-container,jailed-vm,jailed-vm-container
    while (($#)); do
        case $1 in
        --modes) m=${2:-}; shift ;;
        --modes=*) m=${1#--modes=} ;;
        esac
        shift
    done
    [[ $m == all ]] && m=process,container,vm,vm-container,jailed-vm,jailed-vm-container
    echo "$m"
}
# Succeeds, printing the first reason (cut to 160 characters), when every mode of the
# report REPORT came out skipped.
nothing_measured() {
    python3 - "$1" <<'PY'
import json, sys
try:
    modes = json.load(open(sys.argv[1])).get("modes", [])
except (OSError, ValueError):
    sys.exit(1)
if not modes or any(m.get("status") != "skipped" for m in modes):
    sys.exit(1)
print(str(modes[0].get("reason", "no reason given"))[:160])
PY
}
# A report of modes that gave no result: REPORT (for its header) MODE[,MODE] REASON [JOB].
# A services job's report carries a skipped services row with the reason, so the merged
# report says why that mode has none.
failed_report() {
    python3 - "$@" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mode, reason = sys.argv[2], sys.argv[3]
job = sys.argv[4] if len(sys.argv) > 4 else mode
r["modes"] = [{"mode": m, "status": "skipped", "reason": reason,
               "description": "no result: see the reason"} for m in mode.split(",")]
for k in ("start_stop", "unit_size", "density", "workloads", "services", "fs"):
    r[k] = []
if job.endswith(":services"):
    r["services"] = [{"mode": mode, "runner": "", "status": "skipped", "reason": reason,
                      "path": "", "tcp_mbps": None, "rtt_us": None, "redis": [],
                      "redis_reason": reason}]
r["header"]["notes"] = []
print(json.dumps(r))
PY
}

BIN=$(scripts/setup.sh | tail -n 1)
log "guest kernel (guest-kernel/build.sh; cached after the first build)"
kernel=$(guest-kernel/build.sh | tail -n 1) || { log "no guest kernel: VM modes will be skipped"; kernel=; }
# setup.sh's build is static (images/build-agent.sh --host): its nestor is the one
# the workloads and the guests run.
static=$BIN/nestor

out=${NESTOR_COMPARE_OUT:-$repo/target/compare}
mkdir -p "$out"
out=$(cd "$out" && pwd)
args=()
[[ -n $kernel ]] && args+=(--kernel "$kernel")
[[ -n $static ]] && args+=(--workload-bin "$static")

log "nestor bench --quick on this host"
"$BIN/nestor" bench --quick "${args[@]}" --json "$out/host.json" --svg "$out/host-svg" "$@" \
    >"$out/host.md"
cat "$out/host.md"

boots=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["header"]["kvm"]["guest_boot"])' "$out/host.json")
if [[ $boots == True ]]; then
    log "KVM here boots guests: the host report has every mode"
elif [[ ${NESTOR_COMPARE_TESTHOST:-1} == 0 ]]; then
    log "KVM here cannot boot guests; NESTOR_COMPARE_TESTHOST=0: no test-host run"
else
    log "KVM here cannot boot a Linux guest: every mode again inside the KVM test host, one boot per mode"
    read -r -a th_args <<<"${NESTOR_COMPARE_TESTHOST_ARGS:---runs 3 --density-max 3}"
    # Inside, the store lives on the test host's tmpfs: its root is an overlay, on
    # which a container's overlay cannot be mounted. The sample images go in first;
    # `run --vm` boots the kernel and agent initramfs setup.sh installed.
    # The installed kernel and initramfs are refreshed first (cached builds): an agent
    # older than this nestor would refuse its requests.
    vm_dir=$(scripts/vm-assets.sh)
    busybox_img=$(images/build-busybox-image.sh 2>/dev/null | tail -n 1)
    redis_img=$(images/build-redis-image.sh 2>/dev/null | tail -n 1)
    # One test-host boot per mode: the test host's kernel can die after a few dozen
    # nested launches, and a boot that dies then costs one mode, not the whole run. A
    # dead boot is retried once; a mode that fails twice is reported as failed.
    modes=$(modes_of "$@")
    rest=() # the bench arguments without --modes: each boot sets its own
    skip=0
    for x in "$@"; do
        if ((skip)); then skip=0; continue; fi
        case $x in --modes) skip=1 ;; --modes=*) ;; *) rest+=("$x") ;; esac
    done
    # The state-transfer section boots a VM 13 times a round (6 in the plain-microVM
    # mode): for those modes it gets a test-host boot of its own (job
    # MODE:state-transfer). vm-container's fs section (4 VM launches; the other VM modes
    # have no fs rows) gets one too (vm-container:fs), with two vCPUs: with one, the
    # guest's copy and its file server's take turns on it, which caps a read through
    # virtio-fs near half the host's, whatever the path costs. A VM container's services (a
    # networked VM serving TCP, then Redis) get one too (MODE:services): that is where
    # test hosts froze (no panic, no progress), and a retry then redoes only them.
    # Unless --sections was given (then every boot runs those sections).
    user_sections=0
    for x in "${rest[@]}"; do case $x in --sections | --sections=*) user_sections=1 ;; esac; done
    # process and container share a boot (job `process,container`): the bench then runs
    # the native process's and the native container's disk workloads on one file, and
    # their workload ratios compare the same place. One boot fewer, too.
    jobs=()
    for m in ${modes//,/ }; do
        case $m in
        process) [[ ,$modes, == *,container,* ]] || jobs+=("$m") ;;
        container) [[ ,$modes, == *,process,* ]] && jobs+=("process,container") || jobs+=("$m") ;;
        vm) ((user_sections)) && jobs+=("$m") || jobs+=("$m" "$m:state-transfer") ;;
        vm-container) ((user_sections)) && jobs+=("$m") || jobs+=("$m" "$m:services" "$m:state-transfer" "$m:fs") ;;
        jailed-vm-container) ((user_sections)) && jobs+=("$m") || jobs+=("$m" "$m:services" "$m:state-transfer") ;;
        *) jobs+=("$m") ;;
        esac
    done
    # The test host sees this machine's files read-only apart from the checkout and the
    # shares: the reports must land in a shared directory.
    share=()
    [[ $out == "$repo"/* ]] || share=(--share "$out")
    # One job: its test-host boot, retried once. Its status goes to $out/.job-NAME.rc
    # (0: its rows are in testhost-NAME.json; else the last boot's status).
    run_job() {
        local job=$1 m sections th ok=0 attempt status=0 i smp=()
        sections=() th=("${th_args[@]}")
        m=${job%%:*}
        if [[ $job == *:state-transfer ]]; then
            # One round (--quick's): --runs would set the rounds, 13 VM launches each.
            sections=(--sections state-transfer) th=()
            for ((i = 0; i < ${#th_args[@]}; i++)); do
                case ${th_args[i]} in --runs) i=$((i + 1)) ;; --runs=*) ;; *) th+=("${th_args[i]}") ;; esac
            done
        elif [[ $job == *:fs ]]; then
            sections=(--sections fs) smp=(--smp 2)
        elif [[ $job == *:services ]]; then
            sections=(--sections services)
        elif ((!user_sections)) && [[ " ${jobs[*]} " == *" $m:services "* ]]; then
            sections=(--sections start-stop,unit-size,density,workloads)
        elif ((!user_sections)) && [[ " ${jobs[*]} " == *" $m:state-transfer "* ]]; then
            sections=(--sections start-stop,unit-size,density,workloads,services)
        fi
        m=${job/:/-} m=${m//,/+}
        for attempt in 1 2; do
            log "test host: $job (boot $attempt of at most 2)"
            rm -f "$out/testhost-$m.json"
            status=0
            # The boot's progress (stderr) is copied to a log whose growth is its
            # heartbeat: a test host that froze (it happens, without a panic: see
            # tests/testhost/README.md) is ended after $stall s without a byte, not at
            # the limit.
            : >"$out/.progress-$m"
            NESTOR_BIN_DIR="$BIN" tests/testhost/run --timeout "${NESTOR_COMPARE_TESTHOST_TIMEOUT:-900}" "${smp[@]}" "${share[@]}" -- \
                env NESTOR_ROOT=/run/nestor-compare NESTOR_STATE=/run/nestor-compare-state \
                NESTOR_VM_KERNEL="$vm_dir/vmlinux" NESTOR_VM_INITRD="$vm_dir/initramfs.cpio.lz4" bash -c \
                'nestor=$1 busybox=$2 redis=$3; shift 3
                 "$nestor" image import "$busybox" >/dev/null && "$nestor" image import "$redis" >/dev/null &&
                 exec "$nestor" bench "$@"' \
                - "$BIN/nestor" "$busybox_img" "$redis_img" --quick "${args[@]}" "${th[@]}" \
                --json "$out/testhost-$m.json" "${rest[@]}" "${sections[@]}" --modes "${job%%:*}" \
                >"$out/testhost-$m.md" 2> >(tee -a "$out/.progress-$m" >&2) &
            local rpid=$! size=-1 now_size quiet=0
            while kill -0 "$rpid" 2>/dev/null; do
                sleep 5
                now_size=$(stat -c %s "$out/.progress-$m" 2>/dev/null || echo 0)
                if [[ $now_size == "$size" ]]; then
                    quiet=$((quiet + 5))
                    if ((quiet >= stall)); then
                        log "test host: $job: no progress for $quiet s: ending the boot (NESTOR_COMPARE_STALL)"
                        kill -TERM "$rpid" 2>/dev/null
                        break
                    fi
                else
                    size=$now_size quiet=0
                fi
            done
            wait "$rpid" || status=$?
            rm -f "$out/.progress-$m"
            ((quiet >= stall)) && status=124
            if ((status == 0)); then
                # A boot whose modes all came out skipped measured nothing: on Dec 7 every
                # jailed VM of one state-transfer boot ran but its agent never answered,
                # while the same boot measured in the next run. One more boot, as for a
                # boot that died; a second such boot's report stands, with its reasons.
                if ((attempt == 1)) && why=$(nothing_measured "$out/testhost-$m.json"); then
                    log "test host: $job: the boot measured nothing ($why); one more boot"
                    continue
                fi
                ok=1
                break
            fi
            if [[ -s $out/testhost-$m.json ]]; then
                # The bench wrote the mode's rows before the boot died (in its clean-up).
                log "test host: mode $m: the boot failed (status $status) after the mode was measured; keeping its rows"
                ok=1
                break
            fi
            log "test host: mode $m failed (status $status: 123 panic, 124 time-out or no progress)"
        done
        if ((ok)); then
            echo 0 >"$out/.job-$m.rc"
        else
            echo "$status" >"$out/.job-$m.rc"
            failed_report "$out/host.json" "${job%%:*}" "the test-host boot failed twice (last status $status: 123 = its kernel panicked, 124 = time-out or no progress, 125 = harness)" "$job" \
                >"$out/testhost-$m.json"
        fi
    }
    # Boots at once: a test host has one vCPU, so by default one per core, at most 2
    # (the measurements of two boots side by side were checked against one at a time;
    # see the README). Each takes the next job, longest first; its lines are prefixed.
    # vm-container:fs comes last: its two vCPUs then likely have both cores.
    stall=${NESTOR_COMPARE_STALL:-240}
    [[ $stall =~ ^[1-9][0-9]*$ ]] || { log "NESTOR_COMPARE_STALL must be seconds >= 1, got '$stall'"; exit 2; }
    par=${NESTOR_COMPARE_JOBS:-$(($(nproc) >= 2 ? 2 : 1))}
    [[ $par =~ ^[1-9][0-9]*$ ]] || { log "NESTOR_COMPARE_JOBS must be a count >= 1, got '$par'"; exit 2; }
    order=()
    # (Lengths in a quiet run on Dec 7, in s: jailed-vm-container 97, process,container
    # about 95, vm-container 90, its services 81, vm 77, jailed-vm-container's services
    # 73, jailed-vm 67, the state-transfer boots 55, 48 and 23, vm-container:fs 53.)
    for want in jailed-vm-container process,container vm-container vm-container:services vm \
        jailed-vm-container:services jailed-vm container process jailed-vm-container:state-transfer \
        vm-container:state-transfer vm:state-transfer vm-container:fs; do
        [[ " ${jobs[*]} " == *" $want "* ]] && order+=("$want")
    done
    for job in "${jobs[@]}"; do [[ " ${order[*]} " == *" $job "* ]] || order+=("$job"); done
    rm -f "$out"/.job-*.rc
    # A boot runs in the background (for the watchdog), where SIGINT is ignored: on an
    # interrupt, end every boot (tests/testhost/run stops its QEMU on TERM).
    pids=()
    # (`|| true`: under set -e a failing command would end the trap early.)
    trap 'kill "${pids[@]}" 2>/dev/null || true
          pkill -TERM -f -- "--json $out/testhost-" 2>/dev/null || true
          rm -f "$out"/.progress-* "$out"/.job-*.rc "$out/.next"; exit 130' INT TERM
    if ((par > 1 && ${#order[@]} > 1)); then
        log "test host: ${#order[@]} boots, up to $par at once (NESTOR_COMPARE_JOBS)"
        echo 0 >"$out/.next"
        worker() {
            local id
            while :; do
                id=$(flock "$out/.next" bash -c 'i=$(<"$1"); echo $((i + 1)) >"$1"; echo "$i"' _ "$out/.next")
                ((id < ${#order[@]})) || return 0
                run_job "${order[id]}" 2>&1 | sed -u "s/^/[${order[id]}] /" >&2
            done
        }
        for ((w = 0; w < par; w++)); do
            worker &
            pids+=($!)
        done
        wait "${pids[@]}"
        rm -f "$out/.next"
    else
        for job in "${order[@]}"; do run_job "$job"; done
    fi
    trap - INT TERM
    parts=() failed=()
    for job in "${jobs[@]}"; do
        m=${job/:/-} m=${m//,/+}
        if [[ $(cat "$out/.job-$m.rc" 2>/dev/null) == 0 ]]; then
            parts+=("$out/testhost-$m.json")
        else
            failed+=("$m")
        fi
    done
    rm -f "$out"/.job-*.rc
    for m in "${failed[@]}"; do parts+=("$out/testhost-$m.json"); done
    if ((${#parts[@]})) && "$BIN/nestor" bench --merge "${parts[@]}" --json "$out/testhost.json" \
        --svg "$out/testhost-svg" >"$out/testhost.md"; then
        echo
        cat "$out/testhost.md"
        ((${#failed[@]} == 0)) || log "test host: failed modes: ${failed[*]} (the report says so)"
    else
        log "the test-host runs gave no report; the host report above stands"
    fi
fi
echo "$out"
