/* sockops bench: transfer client (compiled with the system cc at bench time, like loadgen.c).
 *
 * C connections download one file over and over, each download on a new connection: connect, send the
 * request, read the reply, close.  Two protocols:
 *   - transfer (default): a frame {"op":"get","path":NAME} (4-byte big-endian length + JSON), a reply frame
 *     whose JSON header must carry "size" equal to the file's size and no "error", then exactly size bytes;
 *   - --raw (the sendfile reference): "get\n", then the body until EOF; a byte past the file's size is an error.
 * Every body byte is compared with the file itself (mmap of --file), so a fast wrong answer never counts.
 * Non-blocking sockets, one epoll loop, large reads: the client costs a fraction of the server's CPU.
 *
 * Bounded in time (--warmup + --duration) and in count (--max-files downloads started), loopback only.
 * Prints "measuring" when the warm-up ends, then one JSON object: body bytes received and checked in the
 * measured window, whole files, errors, and the client's own CPU over the window.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { ST_IDLE, ST_CONNECTING, ST_SENDING, ST_HLEN, ST_HEADER, ST_BODY, ST_EOF };
enum { HEADER_LIMIT = 64 * 1024, RBUF = 1 << 20 };

typedef struct {
    int fd, state;
    size_t sent, got;   /* request bytes sent; bytes of the current part (length, header, body) received */
    uint32_t hlen;
    uint64_t last_ns;   /* last progress, for the timeout */
    uint64_t in_window; /* body bytes received in the measured window */
    char hbuf[HEADER_LIMIT + 1];
} conn_t;

static struct sockaddr_in g_addr;
static int g_raw, g_epfd;
static const unsigned char *g_file;
static size_t g_size;
static char g_req[8192];
static size_t g_reqlen;
static uint64_t g_t_measure, g_t_end, g_timeout_ns, g_max_files, g_started;
static uint64_t g_bytes, g_files, g_errors, g_mismatches, g_timeouts;
static char g_first_error[200];
static unsigned char *g_rbuf;
static volatile sig_atomic_t g_stop;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Count a failure under `counter`, keep the first message, drop the connection (the next download reconnects). */
static void fail(conn_t *c, uint64_t *counter, const char *fmt, ...) {
    (*counter)++;
    if (!g_first_error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g_first_error, sizeof g_first_error, fmt, ap);
        va_end(ap);
    }
    if (c->fd >= 0) {
        epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = ST_IDLE;
}

static void finish(conn_t *c) {
    epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = ST_IDLE;
    if (now_ns() >= g_t_measure) g_files++;
}

static void open_conn(conn_t *c) {
    if (g_stop || g_started >= g_max_files || now_ns() >= g_t_end) return;
    g_started++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->fd = -1;
        fail(c, &g_errors, "socket: %s", strerror(errno));
        return;
    }
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->sent = c->got = 0;
    c->last_ns = now_ns();
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(g_epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr) < 0 && errno != EINPROGRESS)
        fail(c, &g_errors, "connect: %s", strerror(errno));
}

static void send_request(conn_t *c) {
    while (c->sent < g_reqlen) {
        ssize_t n = send(c->fd, g_req + c->sent, g_reqlen - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return;
            fail(c, &g_errors, "send: %s", strerror(errno));
            return;
        }
        c->sent += (size_t)n;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->state = g_raw ? ST_BODY : ST_HLEN;
    c->got = 0;
}

/* The reply header: a JSON object with "size" equal to the file's size and no "error" key. */
static int check_header(conn_t *c) {
    c->hbuf[c->hlen] = 0;
    if (strstr(c->hbuf, "\"error\"")) return -1;
    const char *p = strstr(c->hbuf, "\"size\"");
    if (!p) return -1;
    p += 6;
    while (*p == ' ' || *p == ':') p++;
    char *end;
    unsigned long long v = strtoull(p, &end, 10);
    return end != p && v == g_size ? 0 : -1;
}

/* Consume `n` received bytes at `buf`; returns how many belonged to this reply's current part. */
static size_t take(conn_t *c, const unsigned char *buf, size_t n) {
    size_t want;
    switch (c->state) {
    case ST_HLEN:
        want = 4 - c->got < n ? 4 - c->got : n;
        memcpy(c->hbuf + c->got, buf, want);
        if ((c->got += want) == 4) {
            const unsigned char *b = (const unsigned char *)c->hbuf;
            c->hlen = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
            if (c->hlen == 0 || c->hlen > HEADER_LIMIT) {
                fail(c, &g_errors, "reply header length %u (limit %d)", c->hlen, HEADER_LIMIT);
                return n;
            }
            c->state = ST_HEADER;
            c->got = 0;
        }
        return want;
    case ST_HEADER:
        want = c->hlen - c->got < n ? c->hlen - c->got : n;
        memcpy(c->hbuf + c->got, buf, want);
        if ((c->got += want) == c->hlen) {
            if (check_header(c) < 0) {
                fail(c, &g_errors, "reply header without size %zu or with an error: %.150s", g_size, c->hbuf);
                return n;
            }
            c->state = ST_BODY;
            c->got = 0;
        }
        return want;
    case ST_BODY:
        want = g_size - c->got < n ? g_size - c->got : n;
        if (memcmp(buf, g_file + c->got, want) != 0) {
            fail(c, &g_mismatches, "body differs from the file at offset %zu..%zu", c->got, c->got + want);
            return n;
        }
        c->got += want;
        if (now_ns() >= g_t_measure) {
            g_bytes += want;
            c->in_window += want;
        }
        if (c->got == g_size) {
            if (g_raw) c->state = ST_EOF;
            else finish(c);
        }
        return want;
    default: /* ST_EOF: the raw reference must close right after the file */
        fail(c, &g_mismatches, "%zu bytes past the end of the file", n);
        return n;
    }
}

static void on_readable(conn_t *c) {
    for (int rounds = 0; rounds < 16 && c->fd >= 0; rounds++) { /* bounded: other connections get a turn */
        ssize_t n = recv(c->fd, g_rbuf, RBUF, 0);
        if (n < 0) {
            if (errno != EAGAIN) fail(c, &g_errors, "recv: %s", strerror(errno));
            return;
        }
        c->last_ns = now_ns();
        if (n == 0) {
            if (c->state == ST_EOF) finish(c);
            else fail(c, &g_errors, "server closed the connection at byte %zu of reply part %d", c->got, c->state);
            return;
        }
        size_t off = 0;
        while (off < (size_t)n && c->fd >= 0) off += take(c, g_rbuf + off, (size_t)n - off);
        if (off < (size_t)n && c->state == ST_IDLE && !g_raw) { /* finished, yet more bytes came with it */
            g_mismatches++;
            if (!g_first_error[0])
                snprintf(g_first_error, sizeof g_first_error, "%zu bytes after the reply", (size_t)n - off);
        }
        if (c->fd < 0) return;
    }
}

static void on_event(conn_t *c, uint32_t events) {
    if (c->fd < 0) return;
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            fail(c, &g_errors, "connect: %s", strerror(err ? err : ECONNRESET));
            return;
        }
        c->state = ST_SENDING;
    }
    if (c->state == ST_SENDING) {
        send_request(c);
        return;
    }
    on_readable(c);
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void usage(void) {
    fprintf(stderr, "usage: xferclient --port P --file PATH [--name NAME] [--raw] [--host 127.x.y.z] [--conns C]\n"
                    "                  [--duration S] [--warmup S] [--max-files N] [--timeout-ms MS]\n");
    exit(2);
}

/* The request frame: {"op": "get", "path": NAME}; NAME is JSON-escaped for '"' and '\\' only (the bench's names
 * are plain). */
static int build_request(const char *name) {
    if (g_raw) {
        g_reqlen = (size_t)snprintf(g_req, sizeof g_req, "get\n");
        return 0;
    }
    char json[4096];
    size_t j = (size_t)snprintf(json, sizeof json, "{\"op\": \"get\", \"path\": \"");
    for (const char *p = name; *p; p++) {
        if (j + 8 >= sizeof json || (unsigned char)*p < 32) return -1;
        if (*p == '"' || *p == '\\') json[j++] = '\\';
        json[j++] = *p;
    }
    j += (size_t)snprintf(json + j, sizeof json - j, "\"}");
    g_req[0] = (char)(j >> 24), g_req[1] = (char)(j >> 16), g_req[2] = (char)(j >> 8), g_req[3] = (char)j;
    memcpy(g_req + 4, json, j);
    g_reqlen = 4 + j;
    return 0;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = NULL, *name = NULL;
    int port = 0, conns = 1;
    double duration = 3.0, warmup = 0.5;
    unsigned long long max_files = 100000, timeout_ms = 10000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--raw")) { g_raw = 1; continue; }
        if (!v) usage();
        i++;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--file")) path = v;
        else if (!strcmp(a, "--name")) name = v;
        else if (!strcmp(a, "--conns")) conns = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--max-files")) max_files = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--timeout-ms")) timeout_ms = strtoull(v, NULL, 10);
        else usage();
    }
    if (port <= 0 || port > 65535 || !path || conns < 1 || conns > 4096 || duration <= 0 || duration > 3600 ||
        warmup < 0 || max_files < 1 || timeout_ms < 1)
        usage();
    memset(&g_addr, 0, sizeof g_addr);
    if (inet_pton(AF_INET, host, &g_addr.sin_addr) != 1 || (ntohl(g_addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "xferclient: %s is not a 127.0.0.0/8 address; refusing to send load\n", host);
        return 2;
    }
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size <= 0) {
        fprintf(stderr, "xferclient: cannot read %s: %s\n", path, strerror(errno));
        return 2;
    }
    g_size = (size_t)st.st_size;
    g_file = mmap(NULL, g_size, PROT_READ, MAP_SHARED, fd, 0);
    if (g_file == MAP_FAILED) {
        fprintf(stderr, "xferclient: mmap %s: %s\n", path, strerror(errno));
        return 2;
    }
    if (!name) name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    if (build_request(name) < 0) usage();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    g_rbuf = malloc(RBUF);
    conn_t *all = calloc((size_t)conns, sizeof *all);
    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    g_max_files = max_files;
    g_timeout_ns = timeout_ms * 1000000ull;
    uint64_t t0 = now_ns();
    g_t_measure = t0 + (uint64_t)(warmup * 1e9);
    g_t_end = g_t_measure + (uint64_t)(duration * 1e9);
    for (int i = 0; i < conns; i++) {
        all[i].fd = -1;
        open_conn(&all[i]);
    }
    struct epoll_event evs[256];
    int measuring = 0;
    double cpu0 = 0;
    uint64_t m0 = 0, next_check = t0 + 50000000ull;
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && t >= g_t_measure) {
            measuring = 1;
            cpu0 = cpu_seconds();
            m0 = t;
            printf("measuring\n");
            fflush(stdout);
        }
        if (t >= g_t_end || g_stop) break;
        int n = epoll_wait(g_epfd, evs, 256, 5);
        for (int i = 0; i < n; i++) on_event(evs[i].data.ptr, evs[i].events);
        t = now_ns();
        int busy = 0;
        for (int i = 0; i < conns; i++) {
            conn_t *c = &all[i];
            if (c->fd < 0) open_conn(c); /* the next download: a new connection */
            if (c->fd >= 0 && t >= next_check && t > c->last_ns + g_timeout_ns) /* last_ns may be after t */
                fail(c, &g_timeouts, "no progress within %llu ms", timeout_ms);
            busy |= c->fd >= 0;
        }
        if (t >= next_check) next_check = t + 50000000ull;
        if (!busy && g_started >= g_max_files) break;
    }
    uint64_t m1 = now_ns();
    double cpu1 = cpu_seconds();
    if (!measuring) { /* capped before the warm-up ended: report an empty window, never a made-up one */
        printf("measuring\n");
        m0 = m1;
        cpu0 = cpu1;
    }
    unsigned long long starved = 0;
    for (int i = 0; i < conns; i++) {
        starved += all[i].in_window == 0;
        if (all[i].fd >= 0) close(all[i].fd);
    }
    for (char *p = g_first_error; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 32) *p = ' ';
    printf("{\"bytes\": %llu, \"files\": %llu, \"started\": %llu, \"errors\": %llu, \"mismatches\": %llu, "
           "\"timeouts\": %llu, \"starved\": %llu, \"conns\": %d, \"file_size\": %zu, \"wall_s\": %.6f, "
           "\"client_cpu_s\": %.6f, \"interrupted\": %s, \"first_error\": \"%s\"}\n",
           (unsigned long long)g_bytes, (unsigned long long)g_files, (unsigned long long)g_started,
           (unsigned long long)g_errors, (unsigned long long)g_mismatches, (unsigned long long)g_timeouts, starved,
           conns, g_size, (double)(m1 - m0) / 1e9, cpu1 - cpu0, g_stop ? "true" : "false", g_first_error);
    return 0;
}
