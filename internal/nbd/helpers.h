// C helpers for the Go binding. Every helper that calls libnbd reads
// libnbd's error (which is per OS thread) before returning, because the
// calling goroutine may run on another thread at its next cgo call.
#ifndef CBTFLOW_NBD_HELPERS_H
#define CBTFLOW_NBD_HELPERS_H

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>
#include <sys/mman.h>

// cbt_ret is a libnbd result with, on failure (r == -1), errno and a copy
// of the message that the Go side frees.
typedef struct {
	int64_t r;
	int err;
	char *msg;
} cbt_ret;

static cbt_ret cbt_ok(int64_t r) {
	cbt_ret x = {r, 0, NULL};
	return x;
}

static cbt_ret cbt_fail(void) {
	cbt_ret x = {-1, nbd_get_errno(), NULL};
	const char *m = nbd_get_error();
	x.msg = strdup(m ? m : "unknown libnbd error");
	return x;
}

static cbt_ret cbt_check(int64_t r) {
	return r == -1 ? cbt_fail() : cbt_ok(r);
}

static struct nbd_handle *cbt_create(cbt_ret *r) {
	struct nbd_handle *h = nbd_create();
	if (h == NULL) {
		*r = cbt_fail();
		return NULL;
	}
	/* libnbd zeroes a read's buffer before sending it unless told not
	   to: a guard for callers that use a failed read's buffer, which
	   cbtflow never does, and for a successful read whose reply's chunks
	   add up to its length without covering it (libnbd does not check
	   that), which could leave bytes as they were: the copier's buffers
	   hold zeros or that copy's own data (internal/copier's pool). The
	   memset of every read was a quarter of the copier's CPU. */
	if (nbd_set_pread_initialize(h, false) == -1) {
		*r = cbt_fail();
		nbd_close(h);
		return NULL;
	}
	*r = cbt_ok(0);
	return h;
}

static cbt_ret cbt_connect_uri(struct nbd_handle *h, const char *uri, const char *meta) {
	if (meta != NULL && nbd_add_meta_context(h, meta) == -1)
		return cbt_fail();
	return cbt_check(nbd_connect_uri(h, uri));
}

static cbt_ret cbt_get_size(struct nbd_handle *h) { return cbt_check(nbd_get_size(h)); }
static cbt_ret cbt_can_zero(struct nbd_handle *h) { return cbt_check(nbd_can_zero(h)); }
static cbt_ret cbt_can_fast_zero(struct nbd_handle *h) { return cbt_check(nbd_can_fast_zero(h)); }
static cbt_ret cbt_can_flush(struct nbd_handle *h) { return cbt_check(nbd_can_flush(h)); }
static cbt_ret cbt_can_trim(struct nbd_handle *h) { return cbt_check(nbd_can_trim(h)); }
static cbt_ret cbt_can_multi_conn(struct nbd_handle *h) { return cbt_check(nbd_can_multi_conn(h)); }
static cbt_ret cbt_is_read_only(struct nbd_handle *h) { return cbt_check(nbd_is_read_only(h)); }
static cbt_ret cbt_can_meta_context(struct nbd_handle *h, const char *m) {
	return cbt_check(nbd_can_meta_context(h, m));
}

static cbt_ret cbt_pread(struct nbd_handle *h, void *buf, size_t n, uint64_t off) {
	return cbt_check(nbd_pread(h, buf, n, off, 0));
}
static cbt_ret cbt_pwrite(struct nbd_handle *h, const void *buf, size_t n, uint64_t off, uint32_t fl) {
	return cbt_check(nbd_pwrite(h, buf, n, off, fl));
}
static cbt_ret cbt_zero(struct nbd_handle *h, uint64_t n, uint64_t off, uint32_t fl) {
	return cbt_check(nbd_zero(h, n, off, fl));
}
static cbt_ret cbt_flush(struct nbd_handle *h) { return cbt_check(nbd_flush(h, 0)); }

static cbt_ret cbt_aio_pread(struct nbd_handle *h, void *buf, size_t n, uint64_t off) {
	return cbt_check(nbd_aio_pread(h, buf, n, off, NBD_NULL_COMPLETION, 0));
}
static cbt_ret cbt_aio_pwrite(struct nbd_handle *h, const void *buf, size_t n, uint64_t off, uint32_t fl) {
	return cbt_check(nbd_aio_pwrite(h, buf, n, off, NBD_NULL_COMPLETION, fl));
}
static cbt_ret cbt_aio_zero(struct nbd_handle *h, uint64_t n, uint64_t off, uint32_t fl) {
	return cbt_check(nbd_aio_zero(h, n, off, NBD_NULL_COMPLETION, fl));
}
static cbt_ret cbt_aio_flush(struct nbd_handle *h) {
	return cbt_check(nbd_aio_flush(h, NBD_NULL_COMPLETION, 0));
}
static cbt_ret cbt_aio_get_fd(struct nbd_handle *h) { return cbt_check(nbd_aio_get_fd(h)); }
static cbt_ret cbt_aio_notify_read(struct nbd_handle *h) { return cbt_check(nbd_aio_notify_read(h)); }
static cbt_ret cbt_aio_notify_write(struct nbd_handle *h) { return cbt_check(nbd_aio_notify_write(h)); }
static cbt_ret cbt_aio_in_flight(struct nbd_handle *h) { return cbt_check(nbd_aio_in_flight(h)); }
static cbt_ret cbt_aio_peek(struct nbd_handle *h) { return cbt_check(nbd_aio_peek_command_completed(h)); }
static cbt_ret cbt_aio_command_completed(struct nbd_handle *h, uint64_t c) {
	return cbt_check(nbd_aio_command_completed(h, c));
}
static cbt_ret cbt_poll_one(struct nbd_handle *h, int timeout) {
	int r = nbd_poll(h, timeout);
	if (r == -1 && nbd_get_errno() == EINTR)
		return cbt_ok(0); // a signal is no failure: the caller polls again
	return cbt_check(r);
}

// cbt_done is one retired command.
typedef struct {
	int64_t cookie;
	int err;
	char *msg;
} cbt_done;

// cbt_drain retires up to max completed commands into out, one cgo call for
// many completions. It stops when none is left to retire.
static int cbt_drain(struct nbd_handle *h, cbt_done *out, int max) {
	int n = 0;
	while (n < max) {
		int64_t c = nbd_aio_peek_command_completed(h);
		if (c <= 0)
			break; // 0: none completed yet; -1: nothing in flight
		out[n].cookie = c;
		out[n].err = 0;
		out[n].msg = NULL;
		if (nbd_aio_command_completed(h, (uint64_t)c) == -1) {
			const char *m = nbd_get_error();
			out[n].err = nbd_get_errno();
			if (out[n].err == 0)
				out[n].err = EIO;
			out[n].msg = strdup(m ? m : "unknown libnbd error");
		}
		n++;
	}
	return n;
}

// cbt_poll waits on several handles (and an optional wake-up fd) at once
// and lets each handle's state machine react. r is 1 when wakefd became
// readable, else 0. EINTR counts as a timeout.
static cbt_ret cbt_poll(struct nbd_handle **hs, int n, int wakefd, int timeout, int *failed) {
	struct pollfd fds[9];
	int nfds = 0;
	*failed = -1;
	if (n > 8)
		n = 8;
	for (int i = 0; i < n; i++) {
		int fd = nbd_aio_get_fd(hs[i]);
		if (fd == -1) {
			*failed = i;
			return cbt_fail();
		}
		unsigned dir = nbd_aio_get_direction(hs[i]);
		fds[nfds].fd = fd;
		fds[nfds].events = 0;
		if (dir & LIBNBD_AIO_DIRECTION_READ)
			fds[nfds].events |= POLLIN;
		if (dir & LIBNBD_AIO_DIRECTION_WRITE)
			fds[nfds].events |= POLLOUT;
		fds[nfds].revents = 0;
		nfds++;
	}
	if (wakefd >= 0) {
		fds[nfds].fd = wakefd;
		fds[nfds].events = POLLIN;
		fds[nfds].revents = 0;
		nfds++;
	}
	int r = poll(fds, nfds, timeout);
	if (r == -1) {
		int e = errno;
		if (e == EINTR)
			return cbt_ok(0);
		cbt_ret x = {-1, e, strdup(strerror(e))};
		return x;
	}
	for (int i = 0; i < n; i++) {
		short re = fds[i].revents;
		// libnbd finds out about a hang-up or error by reading.
		if (re & (POLLIN | POLLHUP | POLLERR)) {
			if (nbd_aio_notify_read(hs[i]) == -1) {
				*failed = i;
				return cbt_fail();
			}
		} else if (re & POLLOUT) {
			if (nbd_aio_notify_write(hs[i]) == -1) {
				*failed = i;
				return cbt_fail();
			}
		}
	}
	return cbt_ok(wakefd >= 0 && (fds[nfds - 1].revents & POLLIN) ? 1 : 0);
}

// cbt_extents collects the base:allocation answer of one block status call
// as (length, flags) pairs.
typedef struct {
	uint32_t *e;
	size_t n, cap;
} cbt_extents;

static int cbt_extent_cb(void *ud, const char *ctx, uint64_t off, uint32_t *entries, size_t nr, int *error) {
	cbt_extents *x = ud;
	if (strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
		return 0;
	if (x->n + nr > x->cap) {
		size_t cap = (x->cap + nr) * 2;
		uint32_t *e = realloc(x->e, cap * sizeof *e);
		if (e == NULL) {
			*error = ENOMEM;
			return -1;
		}
		x->e = e;
		x->cap = cap;
	}
	memcpy(x->e + x->n, entries, nr * sizeof *entries);
	x->n += nr;
	return 0;
}

static cbt_ret cbt_block_status(struct nbd_handle *h, uint64_t n, uint64_t off, cbt_extents *x) {
	nbd_extent_callback cb = {.callback = cbt_extent_cb, .user_data = x};
	return cbt_check(nbd_block_status(h, n, off, cb, 0));
}

// cbt_set_sndbuf raises the send buffer of a unix socket to n bytes (the
// kernel caps it at net.core.wmem_max). TCP sockets are left alone: setting
// SO_SNDBUF there would switch off the kernel's autotuning. r is 1 when the
// buffer was changed, 0 when the socket is not a unix socket.
static cbt_ret cbt_set_sndbuf(struct nbd_handle *h, int n) {
	int fd = nbd_aio_get_fd(h);
	if (fd == -1)
		return cbt_fail();
	struct sockaddr_storage ss;
	socklen_t len = sizeof ss;
	if (getsockname(fd, (struct sockaddr *)&ss, &len) == -1) {
		cbt_ret x = {-1, errno, strdup(strerror(errno))};
		return x;
	}
	if (ss.ss_family != AF_UNIX)
		return cbt_ok(0);
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, sizeof n) == -1) {
		cbt_ret x = {-1, errno, strdup(strerror(errno))};
		return x;
	}
	return cbt_ok(1);
}

static void cbt_close(struct nbd_handle *h) {
	// A clean NBD_CMD_DISC only when nothing is in flight: shutdown would
	// otherwise wait for a server that may be hung or gone.
	if (nbd_aio_is_ready(h) == 1 && nbd_aio_in_flight(h) == 0)
		nbd_shutdown(h, 0);
	nbd_close(h);
}

#endif
