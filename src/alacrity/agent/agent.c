/* alacrity-agent: runs commands in the guest for `alacrity vm exec` and `vm cp`.
 *
 * It listens on a vsock port (in the guest) or a Unix socket (tests on the host). Each
 * connection is one session, served by a process of its own: the host sends one EXEC
 * frame (argv, environment, working directory, terminal or not), then STDIN, SIGNAL and
 * RESIZE frames; the agent sends STARTED, STDOUT, STDERR and finally EXIT (or ERROR if
 * the command could not be started). Files move as the output or input of `cat` and
 * `tar` sessions, so the agent needs nothing else. The wire format is
 * src/alacrity/agent/protocol.py's, which is the reference; every frame is checked.
 *
 * Built static when the default guest image is built (vm/initramfs.py); started by /init.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

enum {
    EXEC = 1, STDIN_DATA = 2, SIGNAL = 3, RESIZE = 4,
    STARTED = 16, STDOUT_DATA = 17, STDERR_DATA = 18, EXITED = 19, ERROR = 20,
};
#define MAX_FRAME (1u << 20) /* larger frames are refused: the session ends */
#define MAX_ARGS 4096
#define CHUNK 65536
#define STDIN_ROOM (1u << 20) /* buffered stdin; past it the host's frames wait */
#define EXEC_WAIT_S 30        /* a connection that sends no EXEC in this long is dropped */
#define DRAIN_MS 200          /* output still read this long after the command exits */

static int conn = -1;
static pid_t command = 0;

static void die(const char *what)
{
    /* The session's own failure: its command and connection end, other sessions go on. */
    (void)what;
    if (command > 0)
        kill(-command, SIGKILL);
    _exit(1);
}

static void write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write");
        p += n;
        len -= (size_t)n;
    }
}

/* Header and data in one writev: over vsock a separate 8-byte write is a packet of its own. */
static void send_frame(uint32_t type, const void *data, uint32_t len)
{
    uint8_t head[8];
    memcpy(head, &len, 4); /* x86 and arm64 guests are little-endian, as the wire is */
    memcpy(head + 4, &type, 4);
    struct iovec iov[2] = {{head, 8}, {(void *)data, len}};
    struct iovec *v = iov;
    int count = len ? 2 : 1;
    while (count) {
        ssize_t n = writev(conn, v, count);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write");
        while (count && (size_t)n >= v->iov_len) {
            n -= (ssize_t)v->iov_len;
            v++;
            count--;
        }
        if (count) {
            v->iov_base = (uint8_t *)v->iov_base + n;
            v->iov_len -= (size_t)n;
        }
    }
}

static void send_u32s(uint32_t type, uint32_t a, uint32_t b, int two)
{
    uint32_t v[2] = {a, b};
    send_frame(type, v, two ? 8 : 4);
}

static void send_error(const char *text)
{
    send_frame(ERROR, text, (uint32_t)strlen(text));
}

/* Reads exactly len bytes; 0 at a clean EOF before the first byte, 1 done. */
static int read_exact(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, p + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 && got == 0)
            return 0;
        if (n <= 0)
            die("read");
        got += (size_t)n;
    }
    return 1;
}

/* A frame's body into a fresh, NUL-terminated buffer. */
static uint8_t *read_body(uint32_t len)
{
    uint8_t *data = malloc(len + 1);
    if (!data)
        die("malloc");
    if (len && !read_exact(conn, data, len))
        die("eof in a frame");
    data[len] = 0;
    return data;
}

/* A frame's header: its type (-1 at EOF), and its length in *len (checked). */
static int read_head(uint32_t *len)
{
    uint8_t head[8];
    uint32_t type;
    if (!read_exact(conn, head, 8))
        return -1;
    memcpy(len, head, 4);
    memcpy(&type, head + 4, 4);
    if (*len > MAX_FRAME)
        die("frame too large");
    return (int)type;
}

/* One frame into a fresh buffer; returns its type, or -1 at EOF. */
static int read_frame(uint8_t **data, uint32_t *len)
{
    int type = read_head(len);
    if (type < 0)
        return -1;
    *data = read_body(*len);
    return type;
}

struct request {
    uint32_t flags; /* 1: a terminal */
    uint16_t rows, cols;
    char *cwd;
    char **argv, **envp;
};

/* EXEC: u32 flags, u16 rows, u16 cols, u32 argc, u32 envc, then cwd, argv and env as
 * NUL-terminated strings. Every count and string is checked against the frame. */
static int parse_exec(uint8_t *p, uint32_t len, struct request *r)
{
    uint32_t argc, envc, off = 16;
    if (len < 16)
        return -1;
    memcpy(&r->flags, p, 4);
    memcpy(&r->rows, p + 4, 2);
    memcpy(&r->cols, p + 6, 2);
    memcpy(&argc, p + 8, 4);
    memcpy(&envc, p + 12, 4);
    if (argc < 1 || argc > MAX_ARGS || envc > MAX_ARGS || (r->flags & ~1u))
        return -1;
    r->argv = calloc(argc + 1, sizeof(char *));
    r->envp = calloc(envc + 1, sizeof(char *));
    if (!r->argv || !r->envp)
        return -1;
    for (uint32_t i = 0; i < 1 + argc + envc; i++) {
        if (off >= len)
            return -1;
        char *s = (char *)p + off;
        size_t room = len - off, n = strnlen(s, room);
        if (n == room)
            return -1; /* a string without its NUL */
        if (i == 0)
            r->cwd = s;
        else if (i <= argc)
            r->argv[i - 1] = s;
        else
            r->envp[i - 1 - argc] = s;
        off += (uint32_t)n + 1;
    }
    return off == len ? 0 : -1;
}

static const char *lookup_path(char **envp)
{
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            return *e + 5;
    return "/sbin:/bin:/usr/sbin:/usr/bin";
}

/* Runs argv[0] as execvpe would, with the session's PATH. */
static void exec_command(struct request *r)
{
    const char *path = lookup_path(r->envp);
    char buf[4096];
    if (strchr(r->argv[0], '/')) {
        execve(r->argv[0], r->argv, r->envp);
        return;
    }
    int saved = ENOENT;
    for (const char *dir = path; dir && *dir;) {
        const char *end = strchrnul(dir, ':');
        int n = snprintf(buf, sizeof buf, "%.*s/%s", (int)(end - dir), dir, r->argv[0]);
        if (n > 0 && (size_t)n < sizeof buf) {
            execve(buf, r->argv, r->envp);
            if (errno != ENOENT)
                saved = errno;
        }
        dir = *end ? end + 1 : NULL;
    }
    errno = saved;
}

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void serve(void)
{
    uint8_t *data;
    uint32_t len;
    struct request r = {0};
    alarm(EXEC_WAIT_S);
    int type = read_frame(&data, &len);
    alarm(0);
    if (type != EXEC || parse_exec(data, len, &r) < 0) {
        send_error("the first frame must be a well-formed EXEC");
        return;
    }
    int in[2], out[2], err[2], report[2], master = -1;
    if (pipe2(report, O_CLOEXEC) < 0)
        die("pipe");
    if (r.flags & 1) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
            die("pty");
        struct winsize ws = {.ws_row = r.rows ? r.rows : 24, .ws_col = r.cols ? r.cols : 80};
        ioctl(master, TIOCSWINSZ, &ws);
        in[1] = out[0] = master;
        err[0] = -1;
    } else if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        die("pipe");
    }
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        setsid(); /* its own process group: SIGNAL frames and a lost host reach all of it */
        signal(SIGPIPE, SIG_DFL);
        if (master >= 0) {
            int slave = open(ptsname(master), O_RDWR);
            if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
                _exit(127);
            dup2(slave, 0);
            dup2(slave, 1);
            dup2(slave, 2);
        } else {
            dup2(in[0], 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        if (chdir(r.cwd) == 0)
            exec_command(&r);
        int e = errno;
        write_all(report[1], &e, sizeof e);
        _exit(127);
    }
    close(report[1]);
    if (master < 0) {
        close(in[0]);
        close(out[1]);
        close(err[1]);
    }
    int e;
    if (read(report[0], &e, sizeof e) == (ssize_t)sizeof e) {
        char text[512];
        snprintf(text, sizeof text, "cannot run %s in %s: %s", r.argv[0], r.cwd, strerror(e));
        waitpid(pid, NULL, 0);
        send_error(text);
        return;
    }
    close(report[0]);
    command = pid;
    send_u32s(STARTED, (uint32_t)pid, 0, 0);

    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        die("pidfd_open");
    int stdin_fd = master >= 0 ? master : in[1];
    int out_fd = out[0], err_fd = err[0];
    set_nonblock(stdin_fd);
    /* Stdin waiting for the command: pending[pend_off, pend_off + pend_len). Writes move
     * pend_off; the bytes move back to the front only when a frame would not fit after them. */
    uint8_t *pending = malloc(STDIN_ROOM), buf[CHUNK];
    size_t pend_off = 0, pend_len = 0;
    int stdin_eof = 0, exited = 0, status = 0, host_open = 1;
    if (!pending)
        die("malloc");
    for (;;) {
        if (stdin_eof && !pend_len && stdin_fd >= 0) {
            if (master >= 0) {
                uint8_t eot = 4; /* a terminal's end of input: ^D */
                (void)!write(master, &eot, 1);
            } else {
                close(stdin_fd);
            }
            stdin_fd = -1;
        }
        struct pollfd fds[5];
        int n = 0, i_conn = -1, i_in = -1, i_out = -1, i_err = -1, i_pid = -1;
        if (host_open && pend_len < STDIN_ROOM / 2) {
            fds[n] = (struct pollfd){conn, POLLIN, 0};
            i_conn = n++;
        }
        if (pend_len && stdin_fd >= 0) {
            fds[n] = (struct pollfd){stdin_fd, POLLOUT, 0};
            i_in = n++;
        }
        if (out_fd >= 0) {
            fds[n] = (struct pollfd){out_fd, POLLIN, 0};
            i_out = n++;
        }
        if (err_fd >= 0) {
            fds[n] = (struct pollfd){err_fd, POLLIN, 0};
            i_err = n++;
        }
        if (!exited) {
            fds[n] = (struct pollfd){pidfd, POLLIN, 0};
            i_pid = n++;
        }
        if (exited && out_fd < 0 && err_fd < 0)
            break;
        int ready = poll(fds, (nfds_t)n, exited ? DRAIN_MS : -1);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready == 0)
            break; /* exited, and its output has been quiet for DRAIN_MS: a daemon holds it */
        if (i_out >= 0 && fds[i_out].revents) {
            ssize_t got = read(out_fd, buf, sizeof buf);
            if (got > 0)
                send_frame(STDOUT_DATA, buf, (uint32_t)got);
            else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
                if (out_fd != master)
                    close(out_fd);
                out_fd = -1; /* EOF, or EIO from a pty whose last writer is gone */
            }
        }
        if (i_err >= 0 && fds[i_err].revents) {
            ssize_t got = read(err_fd, buf, sizeof buf);
            if (got > 0)
                send_frame(STDERR_DATA, buf, (uint32_t)got);
            else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
                close(err_fd);
                err_fd = -1;
            }
        }
        if (i_in >= 0 && fds[i_in].revents) {
            ssize_t put = write(stdin_fd, pending + pend_off, pend_len);
            if (put > 0) {
                pend_len -= (size_t)put;
                pend_off = pend_len ? pend_off + (size_t)put : 0;
            } else if (put < 0 && errno != EAGAIN && errno != EINTR) {
                pend_len = 0; /* the command closed its stdin: what it did not read is dropped */
                stdin_eof = 1;
            }
        }
        if (i_conn >= 0 && fds[i_conn].revents) {
            type = read_head(&len);
            data = NULL; /* the EXEC frame's buffer stays: argv points into it */
            if (type == STDIN_DATA && len && !stdin_eof && stdin_fd >= 0) {
                if (len > STDIN_ROOM - pend_len)
                    die("stdin past its window");
                if (len > STDIN_ROOM - pend_off - pend_len) {
                    memmove(pending, pending + pend_off, pend_len);
                    pend_off = 0;
                }
                if (!read_exact(conn, pending + pend_off + pend_len, len))
                    die("eof in a frame");
                pend_len += len;
            } else if (type >= 0) {
                data = read_body(len);
            }
            if (type < 0) {
                host_open = 0; /* the host went away: so does the command */
                kill(-pid, SIGHUP);
                kill(-pid, SIGKILL);
            } else if (type == STDIN_DATA && len == 0) {
                stdin_eof = 1;
            } else if (type == STDIN_DATA) {
                /* taken above, or dropped: the command's stdin is closed */
            } else if (type == SIGNAL && len == 4) {
                uint32_t sig;
                memcpy(&sig, data, 4);
                if (sig >= 1 && sig < 65)
                    kill(-pid, (int)sig);
            } else if (type == RESIZE && len == 4 && master >= 0) {
                struct winsize ws = {0};
                memcpy(&ws.ws_row, data, 2);
                memcpy(&ws.ws_col, data + 2, 2);
                ioctl(master, TIOCSWINSZ, &ws);
            } else if (type != STDIN_DATA && type != RESIZE) {
                die("unknown frame");
            }
            free(data);
        }
        if (i_pid >= 0 && fds[i_pid].revents) {
            waitpid(pid, &status, 0);
            exited = 1;
        }
    }
    if (!exited)
        waitpid(pid, &status, 0);
    if (host_open) {
        if (WIFSIGNALED(status))
            send_u32s(EXITED, 1, (uint32_t)WTERMSIG(status), 1);
        else
            send_u32s(EXITED, 0, (uint32_t)WEXITSTATUS(status), 1);
    }
}

static int listen_on(const char *how, const char *where)
{
    int fd;
    if (!strcmp(how, "--vsock")) {
        struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                   .svm_port = (unsigned)atoi(where)};
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            return -1;
    } else if (!strcmp(how, "--unix")) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        if (strlen(where) >= sizeof addr.sun_path)
            return -1;
        strcpy(addr.sun_path, where);
        unlink(where);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            return -1;
    } else {
        errno = EINVAL;
        return -1;
    }
    return listen(fd, 64) < 0 ? -1 : fd;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: alacrity-agent --vsock PORT | --unix PATH\n");
        return 2;
    }
    int server = listen_on(argv[1], argv[2]);
    if (server < 0) {
        fprintf(stderr, "alacrity-agent: cannot listen on %s %s: %s\n", argv[1], argv[2], strerror(errno));
        return 1;
    }
    struct sigaction sa = {.sa_handler = SIG_IGN, .sa_flags = SA_NOCLDWAIT};
    sigaction(SIGCHLD, &sa, NULL); /* sessions reap themselves */
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        int c = accept4(server, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                usleep(10000); /* out of fds or memory: try again shortly */
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(server);
            signal(SIGCHLD, SIG_DFL);
            conn = c;
            serve();
            _exit(0);
        }
        close(c);
    }
}
