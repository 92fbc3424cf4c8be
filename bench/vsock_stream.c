/* vsock_stream: one raw AF_VSOCK stream between a guest and the host, for bench/vsock.py.
 *
 *   vsock_stream send PORT BYTES   connect to the host (CID 2) on PORT, write BYTES bytes
 *                                  of zeros, shut the write side, wait for the host to close
 *   vsock_stream recv PORT         connect to the host on PORT and read until end of stream
 *
 * Prints the number of bytes moved on stdout (bench/vsock.py checks it). Every failing
 * call prints what failed and exits with status 1; bad arguments exit with status 2.
 * Built by the bench with `gcc -O2 -static` and copied into the guest, so it needs nothing
 * from the guest's image but a kernel with virtio-vsock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BLOCK (64 * 1024) /* what `dd bs=65536` moves in the agent's contender */

static char buf[BLOCK];

static void die(const char *what)
{
    fprintf(stderr, "vsock_stream: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void)
{
    fprintf(stderr, "usage: vsock_stream send PORT BYTES | vsock_stream recv PORT\n");
    exit(2);
}

static unsigned long long number(const char *text, unsigned long long max)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || n > max)
        usage();
    return n;
}

static unsigned long long send_all(int s, unsigned long long total)
{
    unsigned long long sent = 0;
    while (sent < total) {
        size_t want = total - sent < sizeof buf ? (size_t)(total - sent) : sizeof buf;
        ssize_t n = write(s, buf, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        if (n == 0) {
            errno = EPIPE;
            die("write returned 0");
        }
        sent += (unsigned long long)n;
    }
    if (shutdown(s, SHUT_WR) < 0)
        die("shutdown");
    /* The host reads to our end, then closes: wait for that, so the stream is done when we exit. */
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read (waiting for the host to close)");
        }
        fprintf(stderr, "vsock_stream: the host sent %zd bytes; it should only close\n", n);
        exit(1);
    }
    return sent;
}

static unsigned long long recv_all(int s)
{
    unsigned long long got = 0;
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        got += (unsigned long long)n;
    }
    return got;
}

int main(int argc, char **argv)
{
    int sending;
    unsigned long long total = 0;
    if (argc == 4 && !strcmp(argv[1], "send"))
        sending = 1;
    else if (argc == 3 && !strcmp(argv[1], "recv"))
        sending = 0;
    else
        usage();
    unsigned int port = (unsigned int)number(argv[2], UINT_MAX);
    if (sending)
        total = number(argv[3], ULLONG_MAX);

    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        die("socket(AF_VSOCK)");
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect to the host (CID 2)");

    unsigned long long moved = sending ? send_all(s, total) : recv_all(s);
    if (close(s) < 0)
        die("close");
    if (printf("%llu\n", moved) < 0 || fflush(stdout) == EOF)
        die("writing the count");
    return 0;
}
