/* The fork floor: the least a fork-per-connection echo server does, in the smallest process.
 *
 * `fork_loop PORT` listens on 127.0.0.1:PORT (backlog 1024, as forkecho) and, for each
 * connection: accept, fork; the child sends forkecho's default banner and echoes until EOF.
 * SIGCHLD is ignored, so the kernel reaps. No logging, no limits, no descriptor hygiene: every
 * one of those is a cost forkecho pays and this loop does not. Built by the bench with
 * `cc -O2 -static` (a static binary maps the fewest areas, which `fork` copies). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static const char banner[] = "connect successful!\n";

static void echo(int conn) {
    static char buf[64 * 1024]; /* a page is touched only when a read reaches it */
    ssize_t n;
    if (write(conn, banner, sizeof banner - 1) < 0) _exit(1);
    while ((n = read(conn, buf, sizeof buf)) > 0)
        for (ssize_t off = 0, w; off < n; off += w)
            if ((w = write(conn, buf + off, n - off)) <= 0) _exit(1);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1, listener = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1024)) return 1;
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int conn = accept(listener, 0, 0);
        if (conn < 0) continue;
        if (fork() == 0) echo(conn);
        close(conn);
    }
}
