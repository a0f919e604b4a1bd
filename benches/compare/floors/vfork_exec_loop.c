/* The exec floor: the least a server does to run a program per connection.
 *
 * `vfork_exec_loop PORT vfork|fork PROGRAM [ARGS...]` listens on 127.0.0.1:PORT (backlog 1024,
 * as forkecho) and, for each connection: accept, vfork (or fork), dup2 the connection onto
 * fd 0 and fd 1, execve PROGRAM with this process's environment. SIGCHLD is ignored, so the
 * kernel reaps. No logging, no limits, no environment: every one of those is a cost forkecho
 * pays and this loop does not. The only hygiene is free: the listener and each connection are
 * close-on-exec, so the program holds fd 0 and 1 only (dup2 clears the flag on the copies).
 * With `fork` the child copies the parent's page tables first, which `vfork` skips: the
 * difference between the two is what spawning with vfork semantics is worth. Built by the
 * bench with `cc -O2 -static`, like fork_loop.c. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int use_vfork = strcmp(argv[2], "vfork") == 0;
    char **program = argv + 3;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1, listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1024)) return 1;
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int conn = accept4(listener, 0, 0, SOCK_CLOEXEC);
        if (conn < 0) continue;
        /* Between vfork and execve the child only calls async-signal-safe functions and
         * writes no memory: it runs on the parent's. */
        if ((use_vfork ? vfork() : fork()) == 0) {
            if (dup2(conn, 0) < 0 || dup2(conn, 1) < 0) _exit(111);
            execve(program[0], program, environ);
            _exit(111);
        }
        close(conn);
    }
}
