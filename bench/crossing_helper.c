/* A member of bus B that takes over exact pids on request, for bench/crossing.py.
 *
 * At start it forks: the parent is the process the bench admits to bus B and only waits;
 * the child (the worker) reads commands on stdin, one per line, and answers on stdout:
 *
 *   thread PID   start a thread of the worker whose tid is exactly PID
 *   proc PID     start a child process of the worker whose pid is exactly PID
 *   free         make that thread or process exit and wait until PID is free again
 *
 * Answers: "ok PID" or "err ERRNO". The first line out is "ready MEMBER WORKER".
 * Either kind of task descends from the bus-B member: a thread's parent is the worker's
 * parent (the member), a process's parent is the worker. Both wait and do nothing else.
 *
 * Exact pids come from clone3() with set_tid, which needs CAP_SYS_ADMIN over the pid
 * namespace (root in the initial one). x86-64 only: a thread on its own stack needs a
 * few instructions of assembly, since glibc has no public clone3() wrapper.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef __x86_64__
#error "crossing_helper.c starts threads with x86-64 assembly"
#endif

#define STACK_SIZE (64 * 1024)

/* clone3(args, size); the new thread runs fn(arg) on its own stack, then exit(2)s alone.
 * Returns the tid or -errno in the caller. syscall clobbers only rcx and r11, so the
 * child still finds fn in rdx and arg in r8. */
long thread_clone3(struct clone_args *args, size_t size, int (*fn)(void *), void *arg);
__asm__(".text\n"
        ".globl thread_clone3\n"
        ".type thread_clone3, @function\n"
        "thread_clone3:\n"
        "    mov %rcx, %r8\n"
        "    mov $435, %eax\n" /* SYS_clone3 */
        "    syscall\n"
        "    test %rax, %rax\n"
        "    jnz 1f\n"
        "    xor %ebp, %ebp\n"
        "    mov %r8, %rdi\n"
        "    call *%rdx\n"
        "    mov %eax, %edi\n"
        "    mov $60, %eax\n" /* SYS_exit: this thread only */
        "    syscall\n"
        "    hlt\n"
        "1:  ret\n");

/* The thread shares the worker's TLS (no CLONE_SETTLS), so it makes raw syscalls only:
 * glibc's wrappers would write errno into the worker's TLS. */
static long raw_syscall4(long n, long a, long b, long c, long d)
{
    register long r10 __asm__("r10") = d;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}

static int stop_thread;          /* set to 1 to make the thread exit */
static volatile pid_t thread_tid; /* the kernel zeroes it when the thread is gone */
static void *stack;
static pid_t held;               /* the pid or tid we hold, 0 if none */
static int held_is_thread;

static int thread_main(void *unused)
{
    (void)unused;
    while (!__atomic_load_n(&stop_thread, __ATOMIC_ACQUIRE))
        raw_syscall4(SYS_futex, (long)&stop_thread, FUTEX_WAIT, 0, 0);
    return 0;
}

static long take_thread(pid_t pid)
{
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM |
                 CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID;
    args.parent_tid = (uintptr_t)&thread_tid;
    args.child_tid = (uintptr_t)&thread_tid;
    args.stack = (uintptr_t)stack;
    args.stack_size = STACK_SIZE;
    args.set_tid = (uintptr_t)&pid;
    args.set_tid_size = 1;
    __atomic_store_n(&stop_thread, 0, __ATOMIC_RELEASE);
    return thread_clone3(&args, sizeof args, thread_main, NULL);
}

static long take_process(pid_t pid)
{
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    args.set_tid = (uintptr_t)&pid;
    args.set_tid_size = 1;
    long ret = syscall(SYS_clone3, &args, sizeof args);
    if (ret == 0) { /* the child: wait to be killed, and die with the worker */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1)
            _exit(1);
        for (;;)
            pause();
    }
    return ret < 0 ? -errno : ret;
}

static void free_held(void)
{
    if (!held)
        return;
    if (held_is_thread) {
        __atomic_store_n(&stop_thread, 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, &stop_thread, FUTEX_WAKE, 1, NULL, NULL, 0);
        pid_t tid;
        while ((tid = thread_tid) != 0) /* cleared by the kernel as the thread exits */
            syscall(SYS_futex, (pid_t *)&thread_tid, FUTEX_WAIT, tid, NULL, NULL, 0);
        while (syscall(SYS_tgkill, getpid(), held, 0) == 0) /* until its tid is released */
            usleep(10);
    } else {
        kill(held, SIGKILL);
        waitpid(held, NULL, 0); /* reaped: the pid is free */
    }
    held = 0;
}

static void worker(void)
{
    char line[64];
    pid_t pid;

    stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        printf("err %d\n", errno);
        return;
    }
    printf("ready %d %d\n", getppid(), getpid());
    while (fgets(line, sizeof line, stdin)) {
        long ret;
        if (sscanf(line, "thread %d", &pid) == 1 || sscanf(line, "proc %d", &pid) == 1) {
            int thread = line[0] == 't';
            free_held();
            ret = thread ? take_thread(pid) : take_process(pid);
            if (ret > 0) {
                held = (pid_t)ret;
                held_is_thread = thread;
            }
        } else if (strncmp(line, "free", 4) == 0) {
            free_held();
            ret = 0;
        } else {
            ret = -EINVAL;
        }
        if (ret < 0)
            printf("err %ld\n", -ret);
        else
            printf("ok %ld\n", ret);
    }
    free_held();
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* the bench died: so do we */
    pid_t child = fork();
    if (child < 0) {
        printf("err %d\n", errno);
        return 1;
    }
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        worker();
        return 0;
    }
    /* The bus-B member: stdin and stdout belong to the worker. */
    fclose(stdin);
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
