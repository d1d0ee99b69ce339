/* Send one ICMP echo request to the IPv4 address in argv[1] over an ICMP datagram socket
   ("ping socket"), which a user without CAP_NET_RAW may open when net.ipv4.ping_group_range
   includes their group, and wait up to argv[2] seconds (default 2) for the reply. The
   firewall tests run it inside agents as the agent's user, under runc and under gVisor.

   Prints one line and exits with:
     0  "reply from <address>"
     1  "no reply"
     2  "socket <errno name>" when the socket cannot be created
     3  "sendto <errno name>" when the request cannot be sent
     4  "usage: ..." on bad arguments */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *errno_name(int error) {
    const char *name = strerrorname_np(error);
    return name != NULL ? name : "unknown";
}

static long elapsed_ms(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
}

int main(int argc, char **argv) {
    struct sockaddr_in target = {.sin_family = AF_INET};
    if (argc < 2 || argc > 3 || inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) {
        printf("usage: icmp-echo IPV4-ADDRESS [SECONDS]\n");
        return 4;
    }
    long timeout_ms = argc == 3 ? atol(argv[2]) * 1000 : 2000;
    if (timeout_ms <= 0 || timeout_ms > 30000) {
        printf("usage: icmp-echo IPV4-ADDRESS [SECONDS], SECONDS from 1 to 30\n");
        return 4;
    }

    int sock = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP);
    if (sock < 0) {
        printf("socket %s\n", errno_name(errno));
        return 2;
    }

    /* The kernel, or gVisor's netstack, fills in the identifier and the checksum. */
    unsigned char request[sizeof(struct icmphdr) + 18] = {0};
    struct icmphdr *header = (struct icmphdr *)request;
    header->type = ICMP_ECHO;
    header->un.echo.sequence = htons(1);
    memcpy(request + sizeof(struct icmphdr), "agent-runner-probe", 18);
    if (sendto(sock, request, sizeof(request), 0, (struct sockaddr *)&target, sizeof(target)) < 0) {
        printf("sendto %s\n", errno_name(errno));
        return 3;
    }

    /* Only an echo reply counts, so an ICMP error from a router is skipped. */
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long left = timeout_ms; left > 0; left = timeout_ms - elapsed_ms(&start)) {
        struct pollfd ready = {.fd = sock, .events = POLLIN};
        if (poll(&ready, 1, (int)left) <= 0) break;
        unsigned char reply[1500];
        struct sockaddr_in peer;
        socklen_t peer_length = sizeof(peer);
        ssize_t length =
            recvfrom(sock, reply, sizeof(reply), 0, (struct sockaddr *)&peer, &peer_length);
        if (length >= (ssize_t)sizeof(struct icmphdr) && reply[0] == ICMP_ECHOREPLY) {
            char address[INET_ADDRSTRLEN];
            inet_ntop(AF_INET, &peer.sin_addr, address, sizeof(address));
            printf("reply from %s\n", address);
            return 0;
        }
    }
    printf("no reply\n");
    return 1;
}
