/* wait.c: waiting for a socket until a deadline.  Compiled into the library
 * and into its TLS plugin (tls.c waits during the handshake). */
#include <errno.h>
#include <poll.h>
#include <time.h>

#include "p11g.h"

int p11g_ms_left(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ms = (long long)(deadline->tv_sec - now.tv_sec) * 1000 +
                   (deadline->tv_nsec - now.tv_nsec) / 1000000;
    if (ms < 0)
        return 0;
    return ms > 0x7fffffff ? 0x7fffffff : (int)ms;
}

int p11g_wait_fd(int fd, short events, const struct timespec *deadline, int slice_ms)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events, .revents = 0};
        int left = p11g_ms_left(deadline);
        int sliced = slice_ms >= 0 && left > slice_ms;
        int r = poll(&p, 1, sliced ? slice_ms : left);
        if (r > 0)
            return P11G_OK; /* readable, writable, or an error the next call reports */
        if (r == 0)
            return sliced ? P11G_OK : P11G_E_TIMEOUT;
        if (errno != EINTR)
            return P11G_E_NET;
    }
}
