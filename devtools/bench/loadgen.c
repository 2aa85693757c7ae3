/* sockops bench: closed-loop load generator (compiled with the system cc at bench time).
 *
 * C connections (TCP or UDP) each send an S-byte request and wait for the whole reply before sending the next;
 * every reply is checked byte for byte against the ASCII upper-casing of the request.  Non-blocking sockets,
 * one epoll loop per thread, so the client costs little CPU next to the server on a small machine.
 *
 * Bounded in time (--warmup + --duration) and in count (--max-requests attempts), loopback addresses only.
 * Prints "measuring" on stdout when the warm-up ends, then one JSON object with the results when done.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_IDLE, ST_BACKOFF, ST_CONNECTING, ST_SENDING, ST_RECEIVING };
enum { SUB_BITS = 7, SUB = 1 << SUB_BITS, NBUCKETS = 2 * SUB + 56 * SUB };
#define SEQ_DIGITS 10

typedef struct {
    int fd;
    int state;
    int id;
    size_t off;       /* offset of this request in the pattern (TCP) */
    size_t sent, recvd;
    uint64_t t_start; /* request start, ns */
    uint64_t t_retry; /* backoff end, ns */
    uint64_t seq;
    uint64_t done_in_window;
    unsigned char *udp_req, *udp_exp;
} conn_t;

typedef struct {
    uint64_t ok, errors, mismatches, timeouts, lost, late, connects;
    uint64_t hist[NBUCKETS];
    uint64_t sum_ns, max_ns;
    char first_error[160];
} stats_t;

typedef struct {
    int index, nconns;
    conn_t *conns;
    stats_t st;
    unsigned char *rbuf;
    pthread_t tid;
} worker_t;

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static int g_udp, g_newconn;
static size_t g_size;
static uint64_t g_t_measure, g_t_end, g_timeout_ns, g_max_attempts;
static atomic_uint_fast64_t g_attempts;
static unsigned char *g_pattern, *g_expected;
static size_t g_pattern_len;
static volatile sig_atomic_t g_stop;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned char upper(unsigned char c) { return (unsigned char)(c - (((unsigned char)(c - 'a') < 26) << 5)); }

/* Log-linear histogram: exact below 2*SUB ns, then SUB sub-buckets per power of two (< 1% error). */
static int bucket_of(uint64_t v) {
    if (v < 2 * SUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    int idx = 2 * SUB + (msb - SUB_BITS - 1) * SUB + (int)((v >> shift) - SUB);
    return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

static uint64_t bucket_value(int idx) {
    if (idx < 2 * SUB) return (uint64_t)idx;
    int k = idx - 2 * SUB;
    int msb = k / SUB + SUB_BITS + 1;
    int shift = msb - SUB_BITS;
    uint64_t base = ((uint64_t)(k % SUB + SUB)) << shift;
    return base + ((1ull << shift) >> 1); /* middle of the bucket */
}

static void note_error(stats_t *st, const char *what, int err) {
    if (!st->first_error[0]) snprintf(st->first_error, sizeof st->first_error, "%s: %s", what, strerror(err));
}

static void close_conn(worker_t *w, conn_t *c, int epfd, uint64_t backoff_ns) {
    (void)w;
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    if (backoff_ns) {
        c->state = ST_BACKOFF;
        c->t_retry = now_ns() + backoff_ns;
    } else {
        c->state = ST_IDLE;
    }
}

static int take_attempt(void) { return atomic_fetch_add(&g_attempts, 1) < g_max_attempts; }

static int send_some(worker_t *w, conn_t *c, int epfd);

static void start_request(worker_t *w, conn_t *c, int epfd) {
    c->seq++;
    c->sent = c->recvd = 0;
    c->t_start = now_ns();
    if (g_udp) {
        memcpy(c->udp_req, g_pattern + (c->seq * 7) % 256, g_size);
        if (g_size >= 16) { /* the sequence number lets a late reply be told from a wrong one */
            char digits[SEQ_DIGITS + 1];
            snprintf(digits, sizeof digits, "%010llu", (unsigned long long)(c->seq % 10000000000ull));
            memcpy(c->udp_req, digits, SEQ_DIGITS);
        }
        for (size_t i = 0; i < g_size; i++) c->udp_exp[i] = upper(c->udp_req[i]);
    } else {
        c->off = (c->seq * 7) % 256;
    }
    send_some(w, c, epfd);
}

static void set_interest(int epfd, conn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static int open_conn(worker_t *w, conn_t *c, int epfd) {
    if (!take_attempt()) {
        c->state = ST_IDLE;
        return -1;
    }
    int fd = socket(g_addr.ss_family, (g_udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        w->st.errors++;
        note_error(&w->st, "socket", errno);
        c->state = ST_BACKOFF;
        c->t_retry = now_ns() + 10000000ull;
        return -1;
    }
    if (!g_udp) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    c->fd = fd;
    c->t_start = now_ns();
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    w->st.connects++;
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0 && errno != EINPROGRESS) {
        w->st.errors++;
        note_error(&w->st, "connect", errno);
        close_conn(w, c, epfd, 10000000ull);
        return -1;
    }
    if (g_udp) {
        set_interest(epfd, c, EPOLLIN);
        c->state = ST_SENDING;
        start_request(w, c, epfd);
    } else {
        c->state = ST_CONNECTING;
    }
    return 0;
}

static void next_request(worker_t *w, conn_t *c, int epfd) {
    if (g_stop) return;
    if (g_newconn) {
        close_conn(w, c, epfd, 0);
        open_conn(w, c, epfd);
        return;
    }
    if (!take_attempt()) {
        close_conn(w, c, epfd, 0);
        return;
    }
    start_request(w, c, epfd);
}

static void record_ok(worker_t *w, conn_t *c) {
    uint64_t t = now_ns();
    if (t < g_t_measure) return; /* warm-up */
    uint64_t lat = t - c->t_start;
    w->st.ok++;
    c->done_in_window++;
    w->st.hist[bucket_of(lat)]++;
    w->st.sum_ns += lat;
    if (lat > w->st.max_ns) w->st.max_ns = lat;
}

static int counting(void) { return now_ns() >= g_t_measure; }

static int send_some(worker_t *w, conn_t *c, int epfd) {
    if (g_udp) {
        ssize_t n = send(c->fd, c->udp_req, g_size, 0);
        if (n < 0 && errno != EAGAIN && errno != ENOBUFS) {
            w->st.errors++;
            note_error(&w->st, "send", errno);
            close_conn(w, c, epfd, 10000000ull);
            return -1;
        }
        c->sent = g_size; /* a datagram not sent is a lost one: the timeout counts it */
        c->state = ST_RECEIVING;
        return 0;
    }
    while (c->sent < g_size) {
        ssize_t n = send(c->fd, g_pattern + c->off + c->sent, g_size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                c->state = ST_SENDING;
                set_interest(epfd, c, EPOLLIN | EPOLLOUT);
                return 0;
            }
            w->st.errors++;
            note_error(&w->st, "send", errno);
            close_conn(w, c, epfd, 10000000ull);
            return -1;
        }
        c->sent += (size_t)n;
    }
    if (c->state == ST_SENDING || c->state == ST_CONNECTING) set_interest(epfd, c, EPOLLIN);
    c->state = ST_RECEIVING;
    return 0;
}

static void on_readable(worker_t *w, conn_t *c, int epfd) {
    for (;;) {
        ssize_t n = recv(c->fd, w->rbuf, 65536, 0);
        if (n < 0) {
            if (errno == EAGAIN) return;
            w->st.errors++;
            note_error(&w->st, "recv", errno);
            close_conn(w, c, epfd, 10000000ull);
            return;
        }
        if (g_udp) {
            if (c->state != ST_RECEIVING) continue;
            if (g_size >= 16 && (size_t)n == g_size &&
                memcmp(w->rbuf, c->udp_exp, SEQ_DIGITS) != 0) { /* a reply to an earlier, timed-out request */
                if (counting()) w->st.late++;
                continue;
            }
            if ((size_t)n != g_size || memcmp(w->rbuf, c->udp_exp, g_size) != 0) {
                w->st.mismatches++;
                if (!w->st.first_error[0])
                    snprintf(w->st.first_error, sizeof w->st.first_error, "wrong reply (%zd bytes)", n);
                next_request(w, c, epfd);
                if (c->fd < 0) return;
                continue;
            }
            record_ok(w, c);
            next_request(w, c, epfd);
            return;
        }
        if (n == 0) {
            w->st.errors++;
            if (!w->st.first_error[0])
                snprintf(w->st.first_error, sizeof w->st.first_error, "server closed the connection");
            close_conn(w, c, epfd, 10000000ull);
            return;
        }
        if (c->recvd + (size_t)n > c->sent ||
            memcmp(w->rbuf, g_expected + c->off + c->recvd, (size_t)n) != 0) {
            w->st.mismatches++;
            if (!w->st.first_error[0])
                snprintf(w->st.first_error, sizeof w->st.first_error, "wrong reply bytes at offset %zu",
                         c->recvd);
            close_conn(w, c, epfd, 10000000ull);
            return;
        }
        c->recvd += (size_t)n;
        if (c->recvd == g_size) {
            record_ok(w, c);
            next_request(w, c, epfd);
            return; /* level-triggered: anything else queued is reported again */
        }
    }
}

static void on_event(worker_t *w, conn_t *c, uint32_t events, int epfd) {
    if (c->fd < 0) return;
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            w->st.errors++;
            note_error(&w->st, "connect", err ? err : ECONNRESET);
            close_conn(w, c, epfd, 10000000ull);
            return;
        }
        if (!(events & EPOLLOUT)) return;
        c->state = ST_SENDING;
        uint64_t t0 = c->t_start;
        start_request(w, c, epfd);
        if (g_newconn) c->t_start = t0; /* a new-connection request's latency includes the handshake */
        return;
    }
    if (c->state == ST_SENDING && (events & EPOLLOUT)) {
        if (send_some(w, c, epfd) < 0) return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(w, c, epfd);
}

static void check_timeouts(worker_t *w, int epfd, uint64_t t) {
    for (int i = 0; i < w->nconns; i++) {
        conn_t *c = &w->conns[i];
        if (c->state == ST_BACKOFF && t >= c->t_retry) {
            c->state = ST_IDLE;
            open_conn(w, c, epfd);
        } else if (c->state >= ST_CONNECTING && t - c->t_start > g_timeout_ns) {
            if (g_udp && c->state == ST_RECEIVING) {
                if (t >= g_t_measure) w->st.lost++;
                next_request(w, c, epfd);
            } else {
                w->st.timeouts++;
                if (!w->st.first_error[0])
                    snprintf(w->st.first_error, sizeof w->st.first_error, "no reply within %llu ms",
                             (unsigned long long)(g_timeout_ns / 1000000ull));
                close_conn(w, c, epfd, 0);
                open_conn(w, c, epfd);
            }
        }
    }
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[256];
    for (int i = 0; i < w->nconns; i++) open_conn(w, &w->conns[i], epfd);
    uint64_t next_check = now_ns() + 5000000ull;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= g_t_end || g_stop) break;
        int n = epoll_wait(epfd, evs, 256, 5);
        for (int i = 0; i < n; i++) on_event(w, evs[i].data.ptr, evs[i].events, epfd);
        t = now_ns();
        if (t >= next_check) {
            check_timeouts(w, epfd, t);
            next_check = t + 5000000ull;
        }
        if (atomic_load(&g_attempts) >= g_max_attempts) {
            int busy = 0;
            for (int i = 0; i < w->nconns; i++) busy |= w->conns[i].state >= ST_CONNECTING;
            if (!busy) break;
        }
    }
    for (int i = 0; i < w->nconns; i++)
        if (w->conns[i].fd >= 0) close(w->conns[i].fd);
    close(epfd);
    return NULL;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static int parse_loopback(const char *host, int port) {
    memset(&g_addr, 0, sizeof g_addr);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&g_addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&g_addr;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        if ((ntohl(a4->sin_addr.s_addr) >> 24) != 127) return -1;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        g_addrlen = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr)) return -1;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        g_addrlen = sizeof *a6;
        return 0;
    }
    return -1;
}

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --host 127.0.0.1 --port P [--udp] [--newconn] [--conns C] [--size S]\n"
                    "               [--duration S] [--warmup S] [--max-requests N] [--timeout-ms MS]"
                    " [--threads T] [--seed N]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, conns = 1, threads = 1;
    double duration = 1.0, warmup = 0.2;
    unsigned long long max_req = 1000000, timeout_ms = 5000, seed = 1;
    g_size = 64;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--udp")) { g_udp = 1; continue; }
        if (!strcmp(a, "--newconn")) { g_newconn = 1; continue; }
        if (!v) usage();
        i++;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) conns = atoi(v);
        else if (!strcmp(a, "--size")) g_size = (size_t)strtoull(v, NULL, 10);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--max-requests")) max_req = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--timeout-ms")) timeout_ms = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else usage();
    }
    if (port <= 0 || port > 65535 || conns < 1 || conns > 20000 || g_size < 1 || g_size > (1u << 20) ||
        threads < 1 || threads > 64 || duration <= 0 || duration > 3600 || warmup < 0 || max_req < 1 ||
        (g_udp && g_size > 65507))
        usage();
    if (parse_loopback(host, port) < 0) {
        fprintf(stderr, "loadgen: %s is not a loopback address (127.0.0.0/8 or ::1); refusing to send load\n",
                host);
        return 2;
    }
    if (threads > conns) threads = conns;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    /* Requests are slices of one random pattern: lower-case letters, digits, punctuation and high bytes, so a
     * server that upper-cases too much or too little, or echoes a stale slice, is caught. */
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:-_/\n\x80\xe9\xff";
    g_pattern_len = g_size + 512;
    g_pattern = malloc(g_pattern_len);
    g_expected = malloc(g_pattern_len);
    uint64_t x = seed * 6364136223846793005ull + 1442695040888963407ull;
    for (size_t i = 0; i < g_pattern_len; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        g_pattern[i] = (unsigned char)alphabet[x % (sizeof alphabet - 1)];
        g_expected[i] = upper(g_pattern[i]);
    }

    g_max_attempts = max_req;
    g_timeout_ns = timeout_ms * 1000000ull;
    uint64_t t0 = now_ns();
    g_t_measure = t0 + (uint64_t)(warmup * 1e9);
    g_t_end = g_t_measure + (uint64_t)(duration * 1e9);

    worker_t *ws = calloc((size_t)threads, sizeof *ws);
    conn_t *all = calloc((size_t)conns, sizeof *all);
    for (int i = 0; i < conns; i++) {
        all[i].fd = -1;
        all[i].id = i;
        all[i].seq = (uint64_t)i * 1000003ull;
        if (g_udp) {
            all[i].udp_req = malloc(g_size);
            all[i].udp_exp = malloc(g_size);
        }
    }
    int per = conns / threads, extra = conns % threads, at = 0;
    for (int t = 0; t < threads; t++) {
        ws[t].index = t;
        ws[t].nconns = per + (t < extra);
        ws[t].conns = all + at;
        ws[t].rbuf = malloc(65536);
        at += ws[t].nconns;
        pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]);
    }

    struct timespec ts = {.tv_sec = (time_t)warmup, .tv_nsec = (long)((warmup - (double)(time_t)warmup) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR && !g_stop) {
    }
    double cpu0 = cpu_seconds();
    uint64_t m0 = now_ns();
    printf("measuring\n");
    fflush(stdout);
    for (int t = 0; t < threads; t++) pthread_join(ws[t].tid, NULL);
    uint64_t m1 = now_ns();
    double cpu1 = cpu_seconds();

    stats_t tot;
    memset(&tot, 0, sizeof tot);
    for (int t = 0; t < threads; t++) {
        stats_t *s = &ws[t].st;
        tot.ok += s->ok; tot.errors += s->errors; tot.mismatches += s->mismatches; tot.timeouts += s->timeouts;
        tot.lost += s->lost; tot.late += s->late; tot.connects += s->connects; tot.sum_ns += s->sum_ns;
        if (s->max_ns > tot.max_ns) tot.max_ns = s->max_ns;
        for (int b = 0; b < NBUCKETS; b++) tot.hist[b] += s->hist[b];
        if (!tot.first_error[0] && s->first_error[0]) memcpy(tot.first_error, s->first_error, sizeof tot.first_error);
    }
    unsigned long long starved = 0; /* connections that got no reply at all while measuring */
    for (int i = 0; i < conns; i++) starved += all[i].done_in_window == 0;
    double q[3] = {0.50, 0.99, 0.999}, qv[3] = {0, 0, 0};
    for (int k = 0; k < 3 && tot.ok; k++) {
        uint64_t want = (uint64_t)(q[k] * (double)tot.ok + 0.5), seen = 0;
        if (want < 1) want = 1;
        for (int b = 0; b < NBUCKETS; b++) {
            seen += tot.hist[b];
            if (seen >= want) { qv[k] = bucket_value(b) / 1000.0; break; }
        }
    }
    for (char *p = tot.first_error; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 32) *p = ' ';
    printf("{\"requests\": %llu, \"errors\": %llu, \"mismatches\": %llu, \"timeouts\": %llu, \"lost\": %llu, "
           "\"late\": %llu, \"connects\": %llu, \"wall_s\": %.6f, \"client_cpu_s\": %.6f, \"threads\": %d, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, \"mean_us\": %.1f, "
           "\"starved\": %llu, \"conns\": %d, \"attempts_capped\": %s, \"interrupted\": %s, \"first_error\": \"%s\"}\n",
           (unsigned long long)tot.ok, (unsigned long long)tot.errors, (unsigned long long)tot.mismatches,
           (unsigned long long)tot.timeouts, (unsigned long long)tot.lost, (unsigned long long)tot.late,
           (unsigned long long)tot.connects, (double)(m1 - m0) / 1e9, cpu1 - cpu0, threads, qv[0], qv[1], qv[2],
           tot.max_ns / 1000.0, tot.ok ? (double)tot.sum_ns / (double)tot.ok / 1000.0 : 0.0, starved, conns,
           atomic_load(&g_attempts) >= g_max_attempts ? "true" : "false", g_stop ? "true" : "false",
           tot.first_error);
    return 0;
}
