/* bench/cni.py --calibrate: the launcher's forwarding step (cni/forward.py, same wire format) as a
 * compiled program, to measure what a compiled launcher would give. A measurement, not shipped:
 * the issue installs the plugin with a shebang to the real interpreter. No helper, or a helper that
 * declines, exits 97-99 (the Python launcher would run the command itself). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
extern char **environ;
int main(void) {
    const char *name = getenv("NETPLANE_CNI_HELPER");
    if (!name) name = "netplane-cni-helper";
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t n = strlen(name);
    a.sun_path[0] = 0; memcpy(a.sun_path + 1, name, n);
    if (connect(s, (struct sockaddr *)&a, sizeof(sa_family_t) + 1 + n) < 0) return 99;
    static char buf[1 << 20]; size_t len = 4;
    for (char **e = environ; *e; e++) { size_t l = strlen(*e) + 1; memcpy(buf + len, *e, l); len += l; }
    unsigned int block = len - 4; memcpy(buf, &block, 4);
    ssize_t r; while ((r = read(0, buf + len, sizeof buf - len)) > 0) len += r;
    for (size_t off = 0; off < len;) { r = write(s, buf + off, len - off); if (r <= 0) return 98; off += r; }
    shutdown(s, SHUT_WR);
    len = 0; while ((r = read(s, buf + len, sizeof buf - len)) > 0) len += r;
    if (len == 0 || (unsigned char)buf[0] == 255) return 97;
    for (size_t off = 1; off < len;) { r = write(1, buf + off, len - off); if (r <= 0) break; off += r; }
    _exit((unsigned char)buf[0]);
}
