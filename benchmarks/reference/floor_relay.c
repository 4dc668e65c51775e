/*
 * floor_relay: the DNS proxy's relay design (egress_router/proxy/dns_conn.py) written in C, with none of
 * its policy: no connection limit, no backend choice (one backend per port), no retries, no timeouts, no
 * counters, no logs. It is the floor a relay of that design pays in the kernel and in user space, the
 * figure a compiled engine of ours could at best reach; benchmarks/dns_proxy.py runs it as a third side
 * with --floor. Not part of the package, never shipped in the image.
 *
 * Build: cc -O2 -o floor_relay floor_relay.c
 * Run:   floor_relay [-w WORKERS] LISTEN_IP:PORT=BACKEND_IP:PORT ...   (IPv4; SIGTERM or SIGINT ends it)
 *
 * The same syscalls per connection as dns_conn.py: accept4 (non-blocking here, so no MSG_DONTWAIT), the
 * client read while the backend connection is made (up to PENDING bytes), a non-blocking connect whose
 * writability means connected, level-triggered epoll with a mask per socket changed only when what a
 * direction waits for changes, one shared read buffer, bytes copied only when a send is short, an EOF
 * passed on as shutdown(SHUT_WR) once what came before it is sent, both sockets closed when both
 * directions have ended, an error on one side passed on as a reset (SO_LINGER 0) on the other; relayed sides
 * read with EPOLLRDHUP, a read that took all before the peer's FIN sent with MSG_MORE and the FIN passed on at
 * once (one segment for both). With -w N (N > 1) N forked workers each bind their own listeners with
 * SO_REUSEPORT, as ours do.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUFFER (256 * 1024)
#define PENDING (256 * 1024)
#define ACCEPT_BATCH 64
#define MAX_EVENTS 1024
#define MAX_FORWARDS 16
#define PARKED (-1)

struct held { char *data; size_t len; };                   /* bytes a short send left */
struct conn;
struct side { int kind; int fd; int mask; int eof; struct conn *conn; };  /* kind 0: client, 1: backend */
struct conn { struct side a, b; struct held up, down; int connected, ended; struct conn *next_dead; };
struct listener { int kind; int fd; struct sockaddr_in backend; };       /* kind 2 */

static int epfd;
static char buffer[BUFFER];
static struct conn *dead;                                   /* freed after the batch that ended them */
static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static void set_mask(struct side *s, int mask)
{
    struct epoll_event ev = { .events = (unsigned)mask, .data.ptr = s };
    if (mask == s->mask || s->fd < 0 || (mask == 0 && s->mask == PARKED))
        return;
    epoll_ctl(epfd, s->mask == PARKED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, s->fd, &ev);
    s->mask = mask;
}

static void rearm(struct conn *c)
{
    int ma, mb;
    if (c->connected) {
        ma = (!c->a.eof && !c->up.len ? EPOLLIN | EPOLLRDHUP : 0) | (c->down.len ? EPOLLOUT : 0);
        mb = (!c->b.eof && !c->down.len ? EPOLLIN | EPOLLRDHUP : 0) | (c->up.len ? EPOLLOUT : 0);
    } else {
        ma = !c->a.eof && c->up.len < PENDING ? EPOLLIN : 0;
        mb = EPOLLOUT;
    }
    set_mask(&c->a, ma);
    set_mask(&c->b, mb);
}

static void end(struct conn *c, int reset)
{
    struct linger lin = { 1, 0 };
    if (c->ended)
        return;
    c->ended = 1;
    if (reset) {
        setsockopt(c->a.fd, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
        setsockopt(c->b.fd, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
    }
    close(c->a.fd);                                         /* the close takes it out of the epoll set */
    close(c->b.fd);
    c->a.fd = c->b.fd = -1;
    free(c->up.data);
    free(c->down.data);
    c->next_dead = dead;
    dead = c;
}

static void keep(struct held *h, const char *data, size_t len)   /* h is empty */
{
    h->data = malloc(len);
    if (!h->data)
        abort();
    memcpy(h->data, data, len);
    h->len = len;
}

/* an EOF from `from`: passed on to `to` once nothing of that direction is held */
static void passed_on(struct conn *c, struct side *to, struct held *h, struct side *other_from, struct held *other)
{
    if (h->len)
        return rearm(c);
    if (other_from->eof && !other->len)
        return end(c, 0);
    if (shutdown(to->fd, SHUT_WR) < 0)
        return end(c, 1);
    rearm(c);
}

static void pump(struct conn *c, struct side *from, struct side *to, struct held *h, struct side *back,
                 struct held *other, unsigned events)
{
    ssize_t n = recv(from->fd, buffer, BUFFER, 0), sent;
    int last;
    if (n < 0) {
        if (errno != EAGAIN)
            end(c, 1);
        return;
    }
    if (n == 0) {
        from->eof = 1;
        return passed_on(c, to, h, back, other);
    }
    last = (events & EPOLLRDHUP) && n < BUFFER;             /* the peer's FIN came, and this read took all */
    sent = send(to->fd, buffer, (size_t)n, MSG_NOSIGNAL | (last ? MSG_MORE : 0));
    if (sent < 0) {
        if (errno != EAGAIN)
            return end(c, 1);
        sent = 0;
    }
    if (sent < n)
        keep(h, buffer + sent, (size_t)(n - sent));
    if (last) {
        from->eof = 1;
        return passed_on(c, to, h, back, other);
    }
    if (sent < n)
        rearm(c);
}

static void flush(struct conn *c, struct side *from, struct side *to, struct held *h, struct side *back,
                  struct held *other)
{
    ssize_t sent;
    if (!h->len)
        return;
    sent = send(to->fd, h->data, h->len, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN)
            end(c, 1);
        return;
    }
    if ((size_t)sent < h->len) {
        memmove(h->data, h->data + sent, h->len - (size_t)sent);
        h->len -= (size_t)sent;
    } else {
        free(h->data);
        h->data = NULL;
        h->len = 0;
        if (from->eof)
            return passed_on(c, to, h, back, other);
    }
    rearm(c);
}

/* an error or a hang-up on a socket not being read: an error resets both, a hang-up parks the socket */
static void side_failed(struct conn *c, struct side *s)
{
    int code = 0;
    socklen_t len = sizeof code;
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &code, &len);
    if (code)
        return end(c, 1);
    epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
    s->mask = PARKED;
}

static void read_early(struct conn *c)
{
    ssize_t n;
    char *grown;
    if (c->a.eof || c->up.len >= PENDING)
        return side_failed(c, &c->a);
    n = recv(c->a.fd, buffer, PENDING - c->up.len, 0);
    if (n < 0) {
        if (errno != EAGAIN)
            end(c, 1);
        return;
    }
    if (n == 0) {
        c->a.eof = 1;
    } else {
        grown = realloc(c->up.data, c->up.len + (size_t)n);
        if (!grown)
            abort();
        memcpy(grown + c->up.len, buffer, (size_t)n);
        c->up.data = grown;
        c->up.len += (size_t)n;
    }
    rearm(c);
}

static void connect_done(struct conn *c, unsigned events)
{
    int code = 0;
    socklen_t len = sizeof code;
    if (events & (EPOLLERR | EPOLLHUP))
        getsockopt(c->b.fd, SOL_SOCKET, SO_ERROR, &code, &len);
    if (code)
        return end(c, 1);
    if (!(events & EPOLLOUT))
        return;
    c->connected = 1;
    if (c->up.len)
        flush(c, &c->a, &c->b, &c->up, &c->b, &c->down);
    else
        rearm(c);
}

static void on_side(struct side *s, unsigned events)
{
    struct conn *c = s->conn;
    int client = s->kind == 0;
    struct side *self = client ? &c->a : &c->b, *peer = client ? &c->b : &c->a;
    struct held *in = client ? &c->up : &c->down, *out = client ? &c->down : &c->up;
    if (c->ended)
        return;
    if (!c->connected) {
        if (client)
            read_early(c);
        else
            connect_done(c, events);
        return;
    }
    if (events & EPOLLOUT)
        flush(c, peer, self, out, self, in);                /* what the peer sent, now taken by this side */
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP) && !c->ended) {
        if (self->eof || in->len)
            side_failed(c, self);
        else
            pump(c, self, peer, in, peer, out, events);
    }
}

static void on_listener(struct listener *l)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), b;
        struct conn *c;
        struct epoll_event ev;
        if (fd < 0) {
            if (errno == EAGAIN || errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                return;
            continue;
        }
        b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (b < 0) {
            close(fd);
            return;
        }
        setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));
        if (connect(b, (struct sockaddr *)&l->backend, sizeof l->backend) < 0 && errno != EINPROGRESS) {
            close(b);
            close(fd);
            continue;
        }
        c = calloc(1, sizeof *c);
        if (!c)
            abort();
        c->a = (struct side){ 0, fd, EPOLLIN, 0, c };
        c->b = (struct side){ 1, b, EPOLLOUT, 0, c };
        ev = (struct epoll_event){ .events = EPOLLIN, .data.ptr = &c->a };
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
        ev = (struct epoll_event){ .events = EPOLLOUT, .data.ptr = &c->b };
        epoll_ctl(epfd, EPOLL_CTL_ADD, b, &ev);
    }
}

static int parse_addr(const char *text, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host)
        return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((unsigned short)atoi(colon + 1));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int serve(struct sockaddr_in *listen_at, struct sockaddr_in *backends, int forwards, int reuseport)
{
    static struct listener listeners[MAX_FORWARDS];
    struct epoll_event events[MAX_EVENTS];
    epfd = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < forwards; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &listeners[i] };
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &(int){1}, sizeof(int));
        if (reuseport)
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &(int){1}, sizeof(int));
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));  /* inherited by accepted sockets */
        if (bind(fd, (struct sockaddr *)&listen_at[i], sizeof listen_at[i]) < 0 || listen(fd, 4096) < 0) {
            perror("floor_relay: bind/listen");
            return 1;
        }
        listeners[i] = (struct listener){ 2, fd, backends[i] };
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    while (!stopping) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            int kind = *(int *)events[i].data.ptr;
            if (kind == 2)
                on_listener(events[i].data.ptr);
            else
                on_side(events[i].data.ptr, events[i].events);
        }
        while (dead) {
            struct conn *c = dead;
            dead = c->next_dead;
            free(c);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct sockaddr_in listen_at[MAX_FORWARDS], backends[MAX_FORWARDS];
    struct sigaction sa = { .sa_handler = on_signal };
    int workers = 1, forwards = 0, opt;
    while ((opt = getopt(argc, argv, "w:")) != -1) {
        if (opt != 'w' || (workers = atoi(optarg)) < 1) {
            fprintf(stderr, "usage: floor_relay [-w WORKERS] LISTEN_IP:PORT=BACKEND_IP:PORT ...\n");
            return 2;
        }
    }
    for (int i = optind; i < argc && forwards < MAX_FORWARDS; i++, forwards++) {
        char *eq = strchr(argv[i], '=');
        if (!eq)
            return fprintf(stderr, "floor_relay: not LISTEN=BACKEND: %s\n", argv[i]), 2;
        *eq = 0;
        if (parse_addr(argv[i], &listen_at[forwards]) || parse_addr(eq + 1, &backends[forwards]))
            return fprintf(stderr, "floor_relay: not IPv4 address:port: %s=%s\n", argv[i], eq + 1), 2;
    }
    if (!forwards)
        return fprintf(stderr, "floor_relay: no forward given\n"), 2;
    sigaction(SIGTERM, &sa, NULL);                          /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (workers == 1)
        return serve(listen_at, backends, forwards, 0);
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            return serve(listen_at, backends, forwards, 1);
        }
    }
    while (!stopping)
        pause();
    kill(0, SIGTERM);                                        /* its own process group: the workers */
    while (wait(NULL) > 0)
        ;
    return 0;
}
