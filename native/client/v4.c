/* v4.c: which protocol version each connection speaks.
 *
 * The codec negotiates on a connection's first call (see v4.h) and records the
 * outcome here, keyed by the connection's address.  The table is lock-free
 * (the version sits in the low bits of the aligned pointer) so that a fork in
 * the middle of a lookup cannot leave a lock held in the child.  A freed
 * connection's slot may linger; a new connection at the same address starts
 * with SetupArch, which negotiates again and overwrites it. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "v4.h"

#define SLOTS 8
#define VERSION_MASK ((uintptr_t)7)

static atomic_uintptr_t g_slots[SLOTS];
static atomic_uint g_next;

_Static_assert(_Alignof(max_align_t) > VERSION_MASK, "connections are malloc'ed");

unsigned p11g_conn_version(const struct p11g_conn *c)
{
    unsigned fixed = p11g_conn_fixed_version(c); /* a channel: never negotiated */
    if (fixed != 0)
        return fixed;
    uintptr_t key = (uintptr_t)c;
    for (unsigned i = 0; i < SLOTS; i++) {
        uintptr_t v = atomic_load(&g_slots[i]);
        if ((v & ~VERSION_MASK) == key)
            return (unsigned)(v & VERSION_MASK);
    }
    return 0;
}

void p11g_conn_set_version(const struct p11g_conn *c, unsigned version)
{
    uintptr_t key = (uintptr_t)c;
    uintptr_t val = key | ((uintptr_t)version & VERSION_MASK);
    for (unsigned i = 0; i < SLOTS; i++) {
        uintptr_t v = atomic_load(&g_slots[i]);
        if ((v & ~VERSION_MASK) == key) {
            atomic_store(&g_slots[i], val);
            return;
        }
    }
    /* The live connection is always the newest entry: 8 slots outlast any
     * calls still finishing on connections that were replaced. */
    unsigned i = atomic_fetch_add(&g_next, 1) % SLOTS;
    atomic_store(&g_slots[i], val);
}

int p11g_v3_forced(void)
{
    const char *s = getenv("PKCS11PROXY_PROTOCOL");
    return s != NULL && strcmp(s, "3") == 0;
}

unsigned p11g_proto(void)
{
    struct p11g_conn *c;
    size_t max_record;
    if (p11g_acquire(&c, &max_record) != CKR_OK)
        return 3;
    unsigned v = p11g_conn_version(c);
    p11g_release(c);
    return v == 4 ? 4 : 3;
}

CK_RV p11g_v4_output(const struct p11g_reply *rep, const struct p11g_res *value,
                     const struct p11g_res *length, CK_RV mrv, CK_BYTE_PTR out,
                     CK_ULONG_PTR out_len)
{
    if (rep->version != 4)
        return CKR_DEVICE_ERROR; /* reconnected to another server meanwhile */
    if (mrv == CKR_OK && out != NULL) {
        if (value->len > *out_len)
            return CKR_DEVICE_ERROR; /* never past the caller's buffer */
        if (value->len)
            memcpy(out, value->ptr, value->len);
        *out_len = value->len;
        return CKR_OK;
    }
    if (mrv == CKR_OK || mrv == CKR_BUFFER_TOO_SMALL) {
        if (length->h > (uint64_t)(CK_ULONG)-1)
            return CKR_DEVICE_ERROR;
        *out_len = (CK_ULONG)length->h;
    }
    return mrv;
}
