/* Try each probe named on the command line and print "<name> <result>", where result is "ok"
   or the errno name, such as EPERM. The seccomp and file-system integration tests run it in
   containers created with the supervisor's arguments. Each probe uses arguments that succeed,
   or fail with an errno other than EPERM or ENOSYS, when no seccomp filter is in the way, so
   a denial shows as EPERM or ENOSYS. Probes that create a child reap it. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <sys/timex.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long clone_flags(unsigned long flags) {
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static long clone3_plain(void) {
    unsigned long long args[11] = {0};
    args[4] = SIGCHLD; /* exit_signal */
    long pid = syscall(SYS_clone3, args, sizeof(args));
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static long compat_getpid(void) {
    /* A 32-bit syscall through int 0x80. A filter without the i386 ABI kills the process. */
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    return 0;
}

static long fork_and_reap(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    if (pid < 0) return -1;
    waitpid(pid, NULL, 0);
    return 0;
}

static void *thread_main(void *argument) {
    return argument;
}

static long start_thread(void) {
    /* glibc 2.34 and later try clone3 first and fall back to clone only on ENOSYS. */
    pthread_t thread;
    int error = pthread_create(&thread, NULL, thread_main, NULL);
    if (error != 0) {
        errno = error;
        return -1;
    }
    return pthread_join(thread, NULL) == 0 ? 0 : -1;
}

static long name_to_handle(void) {
    char handle[256] = {0};
    int mount_id;
    *(unsigned *)handle = 128; /* struct file_handle.handle_bytes */
    return syscall(SYS_name_to_handle_at, AT_FDCWD, "/", handle, &mount_id, 0);
}

static long perf_open(void) {
    struct perf_event_attr attr = {0};
    attr.type = PERF_TYPE_SOFTWARE;
    attr.size = sizeof(attr);
    attr.config = PERF_COUNT_SW_TASK_CLOCK;
    attr.exclude_kernel = 1;
    attr.exclude_hv = 1;
    return syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
}

static long run(const char *name) {
    char buffer[64] = "probe";
    char copy[64];
    char zeroed[128] = {0};
    struct iovec local = {copy, sizeof(copy)}, remote = {buffer, sizeof(buffer)};
    struct timespec now;
    struct timex tx = {0};

    /* mount */
    if (!strcmp(name, "mount")) return mount("none", "/tmp", "tmpfs", 0, NULL);
    if (!strcmp(name, "umount2")) return umount2("/tmp", MNT_DETACH);
    if (!strcmp(name, "pivot_root")) return syscall(SYS_pivot_root, "/tmp", "/tmp");
    if (!strcmp(name, "fsopen")) return syscall(SYS_fsopen, "tmpfs", 0);
    if (!strcmp(name, "open_tree")) return syscall(SYS_open_tree, AT_FDCWD, "/tmp", 0);

    /* kernel-modules */
    if (!strcmp(name, "init_module")) return syscall(SYS_init_module, buffer, sizeof(buffer), "");
    if (!strcmp(name, "finit_module")) return syscall(SYS_finit_module, 0, "", 0);
    if (!strcmp(name, "delete_module")) return syscall(SYS_delete_module, "absent", O_NONBLOCK);

    /* keyring: KEYCTL_GET_KEYRING_ID of the process keyring (-2), created on demand */
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0, -2, 1);
    if (!strcmp(name, "add_key")) return syscall(SYS_add_key, "user", "probe", "x", 1, -2);
    if (!strcmp(name, "request_key")) return syscall(SYS_request_key, "user", "probe", NULL, -2);

    /* bpf (BPF_MAP_CREATE with an empty attribute) and perf */
    if (!strcmp(name, "bpf")) return syscall(SYS_bpf, 0, zeroed, sizeof(zeroed));
    if (!strcmp(name, "perf_event_open")) return perf_open();

    /* ptrace: PTRACE_TRACEME, and this process's own memory */
    if (!strcmp(name, "ptrace")) return syscall(SYS_ptrace, 0, 0, 0, 0);
    if (!strcmp(name, "process_vm_readv")) return process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    if (!strcmp(name, "process_vm_writev")) return process_vm_writev(getpid(), &remote, 1, &local, 1, 0);
    if (!strcmp(name, "kcmp")) return syscall(SYS_kcmp, getpid(), getpid(), 0, 0, 0);

    /* userfaultfd (UFFD_USER_MODE_ONLY needs no sysctl), io_uring, kexec */
    if (!strcmp(name, "userfaultfd")) return syscall(SYS_userfaultfd, O_CLOEXEC | 1);
    if (!strcmp(name, "io_uring_setup")) return syscall(SYS_io_uring_setup, 1, zeroed);
    if (!strcmp(name, "kexec_load")) return syscall(SYS_kexec_load, 0, 0, NULL, 0);
    if (!strcmp(name, "kexec_file_load")) return syscall(SYS_kexec_file_load, -1, -1, 0, "", 0);

    /* namespaces */
    if (!strcmp(name, "unshare-user")) return unshare(CLONE_NEWUSER);
    if (!strcmp(name, "unshare-net")) return unshare(CLONE_NEWNET);
    if (!strcmp(name, "setns")) return setns(open("/proc/self/ns/uts", O_RDONLY), 0);
    if (!strcmp(name, "clone-newuser")) return clone_flags(CLONE_NEWUSER);
    if (!strcmp(name, "clone-newnet")) return clone_flags(CLONE_NEWNET);
    if (!strcmp(name, "clone-plain")) return clone_flags(0);
    if (!strcmp(name, "clone3")) return clone3_plain();
    if (!strcmp(name, "fork")) return fork_and_reap();
    if (!strcmp(name, "thread")) return start_thread();

    /* clock: setting the current time changes nothing when it succeeds */
    if (!strcmp(name, "clock_settime")) {
        clock_gettime(CLOCK_REALTIME, &now);
        return clock_settime(CLOCK_REALTIME, &now);
    }
    if (!strcmp(name, "clock_adjtime")) return syscall(SYS_clock_adjtime, CLOCK_REALTIME, &tx);
    if (!strcmp(name, "adjtimex")) return adjtimex(&tx);
    if (!strcmp(name, "settimeofday")) return syscall(SYS_settimeofday, NULL, NULL);

    /* host-administration: reboot gets a bad magic number, so it never reboots */
    if (!strcmp(name, "syslog")) return syscall(SYS_syslog, 10, NULL, 0);
    if (!strcmp(name, "modify_ldt")) return syscall(SYS_modify_ldt, 0, buffer, sizeof(buffer));
    if (!strcmp(name, "name_to_handle_at")) return name_to_handle();
    if (!strcmp(name, "reboot")) return syscall(SYS_reboot, 0, 0, 0, NULL);

    /* allowed, or allowed with some arguments only */
    if (!strcmp(name, "personality-no-aslr")) return personality(ADDR_NO_RANDOMIZE);
    if (!strcmp(name, "personality-query")) return personality(0xffffffff) == -1 ? -1 : 0;
    if (!strcmp(name, "getpid")) return getpid() > 0 ? 0 : -1;
    if (!strcmp(name, "mq_open")) return syscall(SYS_mq_open, "probe", O_CREAT | O_RDWR, 0600, NULL);
    if (!strcmp(name, "compat-getpid")) return compat_getpid();

    fprintf(stderr, "sysprobe: unknown probe %s\n", name);
    _exit(254);
}

/* Run one probe in a child process, so that a probe that changes the process (a new user
   namespace, tracing, a persona) or gets it killed leaves the next probes unaffected. */
static void report(const char *name) {
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        errno = 0;
        if (run(name) != -1) _exit(0);
        /* The exit code carries errno; 255 marks a failure that set none. */
        _exit(errno != 0 ? errno : 255);
    }
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) < 0) {
        printf("%s probe-failed-%s\n", name, strerrorname_np(errno));
    } else if (WIFSIGNALED(status)) {
        printf("%s killed-by-signal-%d\n", name, WTERMSIG(status));
    } else if (WEXITSTATUS(status) == 0) {
        printf("%s ok\n", name);
    } else {
        const char *error = strerrorname_np(WEXITSTATUS(status));
        printf("%s %s\n", name, error ? error : "unknown-error");
    }
    fflush(stdout);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) report(argv[i]);
    return 0;
}
