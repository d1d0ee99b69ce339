# shellcheck shell=bash
# Pid-file helpers for deps.sh and stop-deps.sh, which source this file.
#
# deps.sh writes NAME.pid with the pid, and NAME.start with the process start time in clock
# ticks since boot (field 22 of /proc/PID/stat). A pid counts as ours only while that process
# runs the expected binary and still has the recorded start time. A pid that was reused by
# another process after a restart or reboot, even by another dockerd, is never ours.

# Print the start time of a process in clock ticks since boot.
process_start_time() {
    local stat fields
    stat=$(<"/proc/$1/stat") || return 1
    # The command name in field 2 may contain spaces and parentheses, so split after its last ')'.
    read -r -a fields <<<"${stat##*) }"
    # fields[0] is field 3 of the stat line, so field 22 is fields[19].
    echo "${fields[19]}"
}

# Write the pid and start-time files for a process that was just started.
record_pid() {
    local pid_file=$1 pid=$2 start_time
    echo "$pid" >"$pid_file"
    # A process that already exited has no start time, and then the pid is never ours.
    if start_time=$(process_start_time "$pid" 2>/dev/null); then
        echo "$start_time" >"${pid_file%.pid}.start"
    fi
}

# Print the pid from the pid file when that process is ours and alive.
owned_pid() {
    local pid_file=$1 binary=$2 start_file="${1%.pid}.start" pid exe
    [[ -f "$pid_file" && -f "$start_file" ]] || return 1
    pid=$(<"$pid_file")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    # The kernel appends " (deleted)" when a package upgrade replaced the binary.
    [[ "${exe% (deleted)}" == "$(readlink -f "$binary")" ]] || return 1
    [[ "$(process_start_time "$pid" 2>/dev/null)" == "$(<"$start_file")" ]] || return 1
    echo "$pid"
}

remove_pid_file() {
    rm -f "$1" "${1%.pid}.start"
}
