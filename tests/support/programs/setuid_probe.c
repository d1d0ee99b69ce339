/* Print the process's real and effective user and group ids and whether it can act as root.
   The setuid integration test installs it setuid-root and setgid-root in an image and runs
   it as the agent's user: under no-new-privileges the kernel ignores both bits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const char *result(int ret) {
    return ret == -1 ? strerrorname_np(errno) : "ok";
}

int main(void) {
    printf("uid %d\n", (int)getuid());
    printf("euid %d\n", (int)geteuid());
    printf("gid %d\n", (int)getgid());
    printf("egid %d\n", (int)getegid());
    /* /etc/root-only has mode 600 and is owned by root. */
    int fd = open("/etc/root-only", O_RDONLY);
    printf("open-root-only %s\n", result(fd));
    errno = 0;
    printf("setuid-0 %s\n", result(setuid(0)));
    errno = 0;
    printf("setgid-0 %s\n", result(setgid(0)));
    return 0;
}
