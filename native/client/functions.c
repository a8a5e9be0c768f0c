/* functions.c: the PKCS#11 entry points.  Each one checks its arguments
 * locally (NULL pointers, lengths, reserved pointers), fills the argument
 * array of its procedure, runs it through the table-driven codec and copies
 * the validated reply into the caller's memory, never more than the caller's
 * buffer holds.
 *
 * Over protocol version 4 (v4.h) mechanisms and templates are typed, output
 * lengths are asked of the server as the caller asks them (no result cache)
 * and GetAttributeValue fills nested templates; over version 3 (Caml Crush)
 * the original paths below apply unchanged. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "p11g.h"
#include "p11g_procs.h"
#include "v4.h"

#define ARGS(n)                                                                                \
    struct p11g_arg a[n];                                                                      \
    memset(a, 0, sizeof a)
#define MAX_TEMPLATE 4096u /* attributes per template: far beyond any real use */

/* ---- helpers ------------------------------------------------------------- */
CK_RV p11g_run(unsigned proc, const struct p11g_arg *a, struct p11g_result *c, CK_RV *mrv)
{
    CK_RV rv = p11g_call(proc, a, c->r, &c->rep);
    if (rv == CKR_OK)
        *mrv = p11g_rv(c->r[0].h);
    return rv;
}

CK_RV p11g_simple(unsigned proc, const struct p11g_arg *a)
{
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    p11g_reply_free(&c.rep);
    return mrv;
}

static CK_RV session_only(unsigned proc, CK_SESSION_HANDLE s)
{
    ARGS(1);
    a[0].h = s;
    return p11g_simple(proc, a);
}

static CK_RV bytes_ok(const void *p, CK_ULONG n) { return (p == NULL && n != 0) ? CKR_ARGUMENTS_BAD : CKR_OK; }

static void copy_text(CK_UTF8CHAR *dst, size_t cap, const struct p11g_field *f)
{
    size_t n = f->len < cap ? f->len : cap;
    if (n)
        memcpy(dst, f->ptr, n);
    memset(dst + n, ' ', cap - n);
}

static void copy_version(CK_VERSION *v, const struct p11g_field *f)
{
    v->major = f->major;
    v->minor = f->minor;
}

/* Attribute types whose value holds pointers (nested templates): they cannot
 * travel in protocol v3.  CKA_ALLOWED_MECHANISMS is a flat array and can. */
static int nested_attr(CK_ATTRIBUTE_TYPE t)
{
    return (t & CKF_ARRAY_ATTRIBUTE) != 0 && t != CKA_ALLOWED_MECHANISMS;
}

static CK_RV check_template(const CK_ATTRIBUTE *t, CK_ULONG n)
{
    if (p11g_proto() == 4)
        return p11g_v4_tmpl_check(t, n);
    if (t == NULL && n != 0)
        return CKR_ARGUMENTS_BAD;
    if (n > MAX_TEMPLATE)
        return CKR_ARGUMENTS_BAD;
    for (CK_ULONG i = 0; i < n; i++) {
        if (t[i].pValue == NULL && t[i].ulValueLen != 0)
            return CKR_ATTRIBUTE_VALUE_INVALID;
        if (nested_attr(t[i].type) && t[i].ulValueLen != 0)
            return CKR_ATTRIBUTE_VALUE_INVALID;
    }
    return CKR_OK;
}

/* Mechanisms whose parameter structure contains pointers: in protocol v3 the
 * parameter travels as raw bytes, so the server would get our addresses. */
static int pointer_param(CK_MECHANISM_TYPE m)
{
    switch (m) {
    case CKM_AES_GCM: case CKM_AES_CCM:
    case CKM_ECDH1_DERIVE: case CKM_ECDH1_COFACTOR_DERIVE: case CKM_ECMQV_DERIVE:
    case CKM_ECDH_AES_KEY_WRAP: case CKM_RSA_AES_KEY_WRAP:
    case CKM_X9_42_DH_DERIVE: case CKM_X9_42_DH_HYBRID_DERIVE: case CKM_X9_42_MQV_DERIVE:
    case CKM_RC5_CBC: case CKM_RC5_CBC_PAD:
    case CKM_CONCATENATE_BASE_AND_DATA: case CKM_CONCATENATE_DATA_AND_BASE:
    case CKM_XOR_BASE_AND_DATA:
    case CKM_SSL3_MASTER_KEY_DERIVE: case CKM_SSL3_KEY_AND_MAC_DERIVE:
    case CKM_SSL3_MASTER_KEY_DERIVE_DH: case CKM_TLS_MASTER_KEY_DERIVE:
    case CKM_TLS_KEY_AND_MAC_DERIVE: case CKM_TLS_MASTER_KEY_DERIVE_DH: case CKM_TLS_PRF:
    case CKM_WTLS_MASTER_KEY_DERIVE: case CKM_WTLS_MASTER_KEY_DERIVE_DH_ECC: case CKM_WTLS_PRF:
    case CKM_WTLS_SERVER_KEY_AND_MAC_DERIVE: case CKM_WTLS_CLIENT_KEY_AND_MAC_DERIVE:
    case CKM_TLS12_KDF: case CKM_TLS12_MASTER_KEY_DERIVE: case CKM_TLS12_KEY_AND_MAC_DERIVE:
    case CKM_TLS12_MASTER_KEY_DERIVE_DH: case CKM_TLS_KDF:
    case CKM_PKCS5_PBKD2: case CKM_KEY_WRAP_SET_OAEP: case CKM_CMS_SIG:
    case CKM_KIP_DERIVE: case CKM_KIP_WRAP: case CKM_KIP_MAC:
    case CKM_ARIA_ECB_ENCRYPT_DATA: case CKM_ARIA_CBC_ENCRYPT_DATA:
    case CKM_CAMELLIA_ECB_ENCRYPT_DATA: case CKM_CAMELLIA_CBC_ENCRYPT_DATA:
    case CKM_SEED_ECB_ENCRYPT_DATA: case CKM_SEED_CBC_ENCRYPT_DATA:
    case CKM_SKIPJACK_PRIVATE_WRAP: case CKM_SKIPJACK_RELAYX: case CKM_KEA_KEY_DERIVE:
    case CKM_DES_ECB_ENCRYPT_DATA: case CKM_DES_CBC_ENCRYPT_DATA:
    case CKM_DES3_ECB_ENCRYPT_DATA: case CKM_DES3_CBC_ENCRYPT_DATA:
    case CKM_AES_ECB_ENCRYPT_DATA: case CKM_AES_CBC_ENCRYPT_DATA:
    case CKM_GOSTR3410_DERIVE: case CKM_GOSTR3410_KEY_WRAP:
    case 0x1226UL: /* CKM_CHACHA20 (3.0) */
    case 0x4021UL: /* CKM_CHACHA20_POLY1305 (3.0) */
    case 0x402aUL: /* CKM_HKDF_DERIVE (3.0) */
    case 0x402bUL: /* CKM_HKDF_DATA (3.0) */
        return 1;
    default:
        return (m >= CKM_PBE_MD2_DES_CBC && m <= CKM_PBE_SHA1_RC2_40_CBC);
    }
}

/* Checks a mechanism and, where a pointer field is NULL/empty anyway, makes a
 * sanitised copy in *tmp that is safe to send as raw bytes. */
static CK_RV check_mech(const CK_MECHANISM *m, CK_MECHANISM *out, CK_RSA_PKCS_OAEP_PARAMS *oaep)
{
    if (m == NULL)
        return CKR_ARGUMENTS_BAD;
    *out = *m;
    if (p11g_proto() == 4)
        return p11g_v4_mech_check(m); /* typed: every parameter we know travels */
    if (m->pParameter == NULL) {
        if (m->ulParameterLen != 0)
            return CKR_MECHANISM_PARAM_INVALID;
        return CKR_OK;
    }
    if (m->ulParameterLen > P11G_MAX_MECH_PARAM)
        return CKR_MECHANISM_PARAM_INVALID;
    if (pointer_param(m->mechanism))
        return CKR_MECHANISM_PARAM_INVALID;
    if (m->mechanism == CKM_RSA_PKCS_OAEP) {
        if (m->ulParameterLen != sizeof *oaep)
            return CKR_MECHANISM_PARAM_INVALID;
        memcpy(oaep, m->pParameter, sizeof *oaep);
        if (oaep->ulSourceDataLen != 0)
            return CKR_MECHANISM_PARAM_INVALID; /* a label needs protocol v4 */
        oaep->pSourceData = NULL;
        out->pParameter = oaep;
    }
    if (m->mechanism == CKM_EDDSA) {
        /* CK_EDDSA_PARAMS { CK_BBOOL phFlag; CK_ULONG ulContextDataLen;
         * CK_BYTE_PTR pContextData; }: flat when there is no context data. */
        struct eddsa {
            CK_BBOOL ph;
            CK_ULONG len;
            CK_BYTE_PTR data;
        };
        _Static_assert(sizeof(struct eddsa) <= sizeof *oaep, "scratch too small");
        struct eddsa e;
        if (m->ulParameterLen != sizeof e)
            return CKR_MECHANISM_PARAM_INVALID;
        memcpy(&e, m->pParameter, sizeof e);
        if (e.len != 0)
            return CKR_MECHANISM_PARAM_INVALID;
        e.data = NULL;
        memset(oaep, 0, sizeof *oaep);
        memcpy(oaep, &e, sizeof e);
        out->pParameter = oaep;
    }
    return CKR_OK;
}

/* Protocol v4: the caller's buffer size goes to the server (a[n_args].h),
 * which answers as the module would; nothing is cached.  Result: rv, value,
 * length. */
static CK_RV output_call4(unsigned proc, struct p11g_arg *a, unsigned n_args, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len)
{
    CK_RV rv, mrv;
    a[n_args].h = out != NULL ? (uint64_t)*out_len : P11G_OUT_LEN_NULL;
    struct p11g_result c;
    rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    rv = p11g_v4_output(&c.rep, &c.r[1], &c.r[2], mrv, out, out_len);
    p11g_reply_free(&c.rep);
    return rv;
}

/* Length-query emulation (see cache.c and docs/client.md). */
static CK_RV output_call(unsigned proc, unsigned families, CK_SESSION_HANDLE s, uint64_t key,
                         const struct p11g_arg *a, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
    CK_RV rv, mrv;
    if (out_len == NULL)
        return CKR_ARGUMENTS_BAD;
    if (p11g_proto() == 4) {
        /* The v4 call has one more argument, the caller's buffer size. */
        struct p11g_arg a4[6];
        const char *kinds = p11g_procs4[proc - P11G_PROC4_MIN].args;
        size_t n = strlen(kinds);
        if (n == 0 || n > 6)
            return CKR_GENERAL_ERROR;
        memset(a4, 0, sizeof a4);
        memcpy(a4, a, sizeof a4[0] * (n - 1));
        return output_call4(proc, a4, (unsigned)(n - 1), out, out_len);
    }
    if (p11g_cache_take(s, proc, key, out, out_len, &rv))
        return rv;
    struct p11g_result c;
    rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv != CKR_OK) {
        p11g_reply_free(&c.rep);
        return mrv;
    }
    const uint8_t *data = c.r[1].ptr;
    size_t len = c.r[1].len;
    if (out == NULL || *out_len < len) {
        /* The token has finished the operation: keep its output for the
         * application's next call instead of running it again. */
        rv = p11g_cache_put(s, proc, families, key, data, len);
        if (rv == CKR_OK)
            rv = out == NULL ? CKR_OK : CKR_BUFFER_TOO_SMALL;
        *out_len = len;
    } else {
        if (len)
            memcpy(out, data, len);
        *out_len = len;
        rv = CKR_OK;
    }
    p11g_reply_free(&c.rep);
    return rv;
}

static CK_RV data_output(unsigned proc, unsigned families, CK_SESSION_HANDLE s, CK_BYTE_PTR in,
                         CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
    if (bytes_ok(in, in_len) != CKR_OK)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = s;
    a[1].ptr = in;
    a[1].len = in_len;
    return output_call(proc, families, s, p11g_hash(0, in, in_len), a, out, out_len);
}

static CK_RV final_output(unsigned proc, unsigned families, CK_SESSION_HANDLE s, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len)
{
    ARGS(1);
    a[0].h = s;
    return output_call(proc, families, s, 0, a, out, out_len);
}

static CK_RV session_data(unsigned proc, CK_SESSION_HANDLE s, CK_BYTE_PTR p, CK_ULONG n)
{
    if (bytes_ok(p, n) != CKR_OK)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = s;
    a[1].ptr = p;
    a[1].len = n;
    return p11g_simple(proc, a);
}

static CK_RV op_init(unsigned proc, unsigned families, CK_SESSION_HANDLE s, CK_MECHANISM_PTR m,
                     int has_key, CK_OBJECT_HANDLE key)
{
    CK_MECHANISM mech;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    CK_RV rv = check_mech(m, &mech, &oaep);
    if (rv != CKR_OK)
        return rv;
    if (p11g_proto() == 3 && p11g_cache_busy(s, families))
        return CKR_OPERATION_ACTIVE; /* a query's result is still waiting for the app */
    ARGS(3);
    a[0].h = s;
    a[1].mech = &mech;
    if (has_key)
        a[2].h = key;
    return p11g_simple(proc, a);
}

/* Result is rv + one handle. */
static CK_RV handle_result(unsigned proc, const struct p11g_arg *a, CK_OBJECT_HANDLE_PTR out)
{
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK)
        *out = (CK_ULONG)c.r[1].h;
    p11g_reply_free(&c.rep);
    return mrv;
}

/* ---- general ---------------------------------------------------------------- */
P11G_EXPORT CK_RV C_GetInfo(CK_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(1);
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetInfo, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        const struct p11g_field *f = c.r[1].f;
        memset(pInfo, 0, sizeof *pInfo);
        copy_version(&pInfo->cryptokiVersion, &f[P11G_INFO_CRYPTOKI_VERSION]);
        copy_text(pInfo->manufacturerID, 32, &f[P11G_INFO_MANUFACTURER_ID]);
        pInfo->flags = (CK_FLAGS)f[P11G_INFO_FLAGS].h;
        copy_text(pInfo->libraryDescription, 32, &f[P11G_INFO_LIBRARY_DESCRIPTION]);
        copy_version(&pInfo->libraryVersion, &f[P11G_INFO_LIBRARY_VERSION]);
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

/* GetSlotList / GetMechanismList: count 0 asks for the number only. */
static CK_RV id_list(unsigned proc, uint64_t first, CK_ULONG_PTR list, CK_ULONG_PTR count)
{
    if (count == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = first;
    a[1].h = list != NULL ? *count : 0;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    uint64_t n = c.r[2].h;
    uint32_t got = c.r[1].len;
    if (mrv != CKR_OK && mrv != CKR_BUFFER_TOO_SMALL) {
        rv = mrv;
    } else if (n > 0xFFFFFFFFu) {
        rv = CKR_DEVICE_ERROR;
    } else if (list == NULL) {
        *count = (CK_ULONG)n;
        rv = CKR_OK;
    } else if (mrv == CKR_BUFFER_TOO_SMALL || n > *count || got > *count) {
        /* Never copy more than the caller's array holds. */
        *count = (CK_ULONG)(n > got ? n : got);
        rv = CKR_BUFFER_TOO_SMALL;
    } else if (got != n) {
        rv = CKR_DEVICE_ERROR; /* the server contradicts itself */
    } else {
        for (uint32_t i = 0; i < got; i++)
            list[i] = (CK_ULONG)p11g_list_get(c.r[1].ptr, i);
        *count = got;
        rv = CKR_OK;
    }
    p11g_reply_free(&c.rep);
    return rv;
}

P11G_EXPORT CK_RV C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList,
                                CK_ULONG_PTR pulCount)
{
    return id_list(P11G_PROC_GetSlotList, tokenPresent ? 1 : 0, pSlotList, pulCount);
}

P11G_EXPORT CK_RV C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList,
                                     CK_ULONG_PTR pulCount)
{
    return id_list(P11G_PROC_GetMechanismList, slotID, pMechanismList, pulCount);
}

P11G_EXPORT CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(1);
    a[0].h = slotID;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetSlotInfo, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        const struct p11g_field *f = c.r[1].f;
        memset(pInfo, 0, sizeof *pInfo);
        copy_text(pInfo->slotDescription, 64, &f[P11G_SLOT_INFO_SLOT_DESCRIPTION]);
        copy_text(pInfo->manufacturerID, 32, &f[P11G_SLOT_INFO_MANUFACTURER_ID]);
        pInfo->flags = (CK_FLAGS)f[P11G_SLOT_INFO_FLAGS].h;
        copy_version(&pInfo->hardwareVersion, &f[P11G_SLOT_INFO_HARDWARE_VERSION]);
        copy_version(&pInfo->firmwareVersion, &f[P11G_SLOT_INFO_FIRMWARE_VERSION]);
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

P11G_EXPORT CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(1);
    a[0].h = slotID;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetTokenInfo, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        const struct p11g_field *f = c.r[1].f;
        memset(pInfo, 0, sizeof *pInfo);
        copy_text(pInfo->label, 32, &f[P11G_TOKEN_INFO_LABEL]);
        copy_text(pInfo->manufacturerID, 32, &f[P11G_TOKEN_INFO_MANUFACTURER_ID]);
        copy_text(pInfo->model, 16, &f[P11G_TOKEN_INFO_MODEL]);
        copy_text(pInfo->serialNumber, 16, &f[P11G_TOKEN_INFO_SERIAL_NUMBER]);
        pInfo->flags = (CK_FLAGS)f[P11G_TOKEN_INFO_FLAGS].h;
        pInfo->ulMaxSessionCount = (CK_ULONG)f[P11G_TOKEN_INFO_MAX_SESSION_COUNT].h;
        pInfo->ulSessionCount = (CK_ULONG)f[P11G_TOKEN_INFO_SESSION_COUNT].h;
        pInfo->ulMaxRwSessionCount = (CK_ULONG)f[P11G_TOKEN_INFO_MAX_RW_SESSION_COUNT].h;
        pInfo->ulRwSessionCount = (CK_ULONG)f[P11G_TOKEN_INFO_RW_SESSION_COUNT].h;
        pInfo->ulMaxPinLen = (CK_ULONG)f[P11G_TOKEN_INFO_MAX_PIN_LEN].h;
        pInfo->ulMinPinLen = (CK_ULONG)f[P11G_TOKEN_INFO_MIN_PIN_LEN].h;
        pInfo->ulTotalPublicMemory = (CK_ULONG)f[P11G_TOKEN_INFO_TOTAL_PUBLIC_MEMORY].h;
        pInfo->ulFreePublicMemory = (CK_ULONG)f[P11G_TOKEN_INFO_FREE_PUBLIC_MEMORY].h;
        pInfo->ulTotalPrivateMemory = (CK_ULONG)f[P11G_TOKEN_INFO_TOTAL_PRIVATE_MEMORY].h;
        pInfo->ulFreePrivateMemory = (CK_ULONG)f[P11G_TOKEN_INFO_FREE_PRIVATE_MEMORY].h;
        copy_version(&pInfo->hardwareVersion, &f[P11G_TOKEN_INFO_HARDWARE_VERSION]);
        copy_version(&pInfo->firmwareVersion, &f[P11G_TOKEN_INFO_FIRMWARE_VERSION]);
        copy_text(pInfo->utcTime, 16, &f[P11G_TOKEN_INFO_UTC_TIME]);
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

P11G_EXPORT CK_RV C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type,
                                     CK_MECHANISM_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = slotID;
    a[1].h = type;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetMechanismInfo, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        const struct p11g_field *f = c.r[1].f;
        pInfo->ulMinKeySize = (CK_ULONG)f[P11G_MECHANISM_INFO_MIN_KEY_SIZE].h;
        pInfo->ulMaxKeySize = (CK_ULONG)f[P11G_MECHANISM_INFO_MAX_KEY_SIZE].h;
        pInfo->flags = (CK_FLAGS)f[P11G_MECHANISM_INFO_FLAGS].h;
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

P11G_EXPORT CK_RV C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved)
{
    if (pSlot == NULL || pReserved != NULL)
        return CKR_ARGUMENTS_BAD;
    /* A blocking wait would hold a server worker and our connection; poll
     * with CKF_DONT_BLOCK instead, and stop when C_Finalize runs. */
    unsigned long gen = p11g_generation();
    for (;;) {
        ARGS(1);
        a[0].h = flags | CKF_DONT_BLOCK;
        struct p11g_result c;
        CK_RV mrv;
        CK_RV rv = p11g_run(P11G_PROC_WaitForSlotEvent, a, &c, &mrv);
        if (rv != CKR_OK)
            return rv;
        if (mrv == CKR_OK)
            *pSlot = (CK_SLOT_ID)c.r[1].h;
        p11g_reply_free(&c.rep);
        if (mrv != CKR_NO_EVENT || (flags & CKF_DONT_BLOCK))
            return mrv;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (p11g_generation() != gen)
            return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
}

/* ---- tokens, sessions, login --------------------------------------------------- */
P11G_EXPORT CK_RV C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen,
                              CK_UTF8CHAR_PTR pLabel)
{
    if (pLabel == NULL || bytes_ok(pPin, ulPinLen) != CKR_OK)
        return CKR_ARGUMENTS_BAD;
    ARGS(3);
    a[0].h = slotID;
    a[1].ptr = pPin;
    a[1].len = ulPinLen;
    a[2].ptr = pLabel;
    a[2].len = 32; /* the label is exactly 32 blank-padded bytes */
    return p11g_simple(P11G_PROC_InitToken, a);
}

P11G_EXPORT CK_RV C_InitPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen)
{
    return session_data(P11G_PROC_InitPIN, hSession, pPin, ulPinLen);
}

P11G_EXPORT CK_RV C_SetPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen,
                           CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen)
{
    if (bytes_ok(pOldPin, ulOldLen) != CKR_OK || bytes_ok(pNewPin, ulNewLen) != CKR_OK)
        return CKR_ARGUMENTS_BAD;
    ARGS(3);
    a[0].h = hSession;
    a[1].ptr = pOldPin;
    a[1].len = ulOldLen;
    a[2].ptr = pNewPin;
    a[2].len = ulNewLen;
    return p11g_simple(P11G_PROC_SetPIN, a);
}

P11G_EXPORT CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication,
                                CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession)
{
    (void)pApplication;
    (void)Notify; /* callbacks cannot cross the protocol; PKCS#11 lets us not call them */
    if (phSession == NULL)
        return CKR_ARGUMENTS_BAD;
    if (!(flags & CKF_SERIAL_SESSION))
        return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
    ARGS(2);
    a[0].h = slotID;
    a[1].h = flags;
    return handle_result(P11G_PROC_OpenSession, a, phSession);
}

P11G_EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE hSession)
{
    CK_RV rv = session_only(P11G_PROC_CloseSession, hSession);
    p11g_cache_drop_session(hSession);
    return rv;
}

P11G_EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slotID)
{
    ARGS(1);
    a[0].h = slotID;
    CK_RV rv = p11g_simple(P11G_PROC_CloseAllSessions, a);
    p11g_cache_clear(); /* we do not track which session lives in which slot */
    return rv;
}

P11G_EXPORT CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo)
{
    if (pInfo == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(1);
    a[0].h = hSession;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetSessionInfo, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        const struct p11g_field *f = c.r[1].f;
        pInfo->slotID = (CK_SLOT_ID)f[P11G_SESSION_INFO_SLOT_ID].h;
        pInfo->state = (CK_STATE)f[P11G_SESSION_INFO_STATE].h;
        pInfo->flags = (CK_FLAGS)f[P11G_SESSION_INFO_FLAGS].h;
        pInfo->ulDeviceError = (CK_ULONG)f[P11G_SESSION_INFO_DEVICE_ERROR].h;
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

P11G_EXPORT CK_RV C_GetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState,
                                      CK_ULONG_PTR pulOperationStateLen)
{
    return final_output(P11G_PROC_GetOperationState, P11G_FAM_OTHER, hSession, pOperationState,
                        pulOperationStateLen);
}

P11G_EXPORT CK_RV C_SetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState,
                                      CK_ULONG ulOperationStateLen,
                                      CK_OBJECT_HANDLE hEncryptionKey,
                                      CK_OBJECT_HANDLE hAuthenticationKey)
{
    if (pOperationState == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(4);
    a[0].h = hSession;
    a[1].ptr = pOperationState;
    a[1].len = ulOperationStateLen;
    a[2].h = hEncryptionKey;
    a[3].h = hAuthenticationKey;
    return p11g_simple(P11G_PROC_SetOperationState, a);
}

P11G_EXPORT CK_RV C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin,
                          CK_ULONG ulPinLen)
{
    if (bytes_ok(pPin, ulPinLen) != CKR_OK)
        return CKR_ARGUMENTS_BAD;
    ARGS(3);
    a[0].h = hSession;
    a[1].h = userType;
    a[2].ptr = pPin;
    a[2].len = ulPinLen;
    return p11g_simple(P11G_PROC_Login, a);
}

P11G_EXPORT CK_RV C_Logout(CK_SESSION_HANDLE hSession)
{
    return session_only(P11G_PROC_Logout, hSession);
}

/* ---- objects --------------------------------------------------------------------- */
P11G_EXPORT CK_RV C_CreateObject(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                                 CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject)
{
    if (phObject == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_template(pTemplate, ulCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(2);
    a[0].h = hSession;
    a[1].tmpl = pTemplate;
    a[1].count = ulCount;
    return handle_result(P11G_PROC_CreateObject, a, phObject);
}

P11G_EXPORT CK_RV C_CopyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                               CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                               CK_OBJECT_HANDLE_PTR phNewObject)
{
    if (phNewObject == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_template(pTemplate, ulCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(3);
    a[0].h = hSession;
    a[1].h = hObject;
    a[2].tmpl = pTemplate;
    a[2].count = ulCount;
    return handle_result(P11G_PROC_CopyObject, a, phNewObject);
}

P11G_EXPORT CK_RV C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject)
{
    ARGS(2);
    a[0].h = hSession;
    a[1].h = hObject;
    return p11g_simple(P11G_PROC_DestroyObject, a);
}

P11G_EXPORT CK_RV C_GetObjectSize(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                                  CK_ULONG_PTR pulSize)
{
    if (pulSize == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = hSession;
    a[1].h = hObject;
    return handle_result(P11G_PROC_GetObjectSize, a, pulSize);
}

/* Protocol v4: the types go out, typed values come back, and the caller's
 * buffers are filled here (v4tmpl.c), nested templates included. */
static CK_RV get_attributes4(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
                             CK_ULONG n)
{
    ARGS(3);
    a[0].h = s;
    a[1].h = o;
    a[2].tmpl = t;
    a[2].count = n;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetAttributeValue, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (c.rep.version != 4)
        rv = CKR_DEVICE_ERROR; /* reconnected to another server meanwhile */
    else
        rv = p11g_v4_tmpl_fill(t, n, c.r[1].ptr, c.r[1].len, mrv);
    p11g_reply_free(&c.rep);
    return rv;
}

P11G_EXPORT CK_RV C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                                      CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)
{
    if ((pTemplate == NULL && ulCount != 0) || ulCount > MAX_TEMPLATE)
        return CKR_ARGUMENTS_BAD;
    if (p11g_proto() == 4)
        return get_attributes4(hSession, hObject, pTemplate, ulCount);
    /* What goes on the wire: nested templates are asked as length queries
     * only (their values hold pointers); see check below. */
    CK_ATTRIBUTE *wire = calloc(ulCount ? ulCount : 1, sizeof *wire);
    if (wire == NULL)
        return CKR_HOST_MEMORY;
    for (CK_ULONG i = 0; i < ulCount; i++) {
        wire[i] = pTemplate[i];
        if (nested_attr(wire[i].type) || wire[i].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
            wire[i].pValue = NULL;
            wire[i].ulValueLen = 0;
        }
    }
    ARGS(3);
    a[0].h = hSession;
    a[1].h = hObject;
    a[2].tmpl = wire;
    a[2].count = ulCount;
    a[2].tmpl_mode = P11G_T_OUT;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GetAttributeValue, a, &c, &mrv);
    if (rv != CKR_OK) {
        free(wire);
        return rv;
    }
    uint32_t n = c.r[1].len;
    if (n == 0 && ulCount != 0 && mrv != CKR_OK) {
        rv = mrv; /* no template came back: nothing to fill in */
        goto out;
    }
    if (n != ulCount) {
        rv = CKR_DEVICE_ERROR;
        goto out;
    }
    /* Pass 1: validate everything against the caller's buffers. */
    struct p11g_dec d;
    p11g_dec_init(&d, c.r[1].ptr, c.rep.len - (size_t)(c.r[1].ptr - c.rep.buf));
    for (uint32_t i = 0; i < n; i++) {
        uint64_t type, vlen;
        const uint8_t *p;
        uint32_t olen;
        p11g_tmpl_next(&d, &type, &p, &olen, &vlen);
        if (type != pTemplate[i].type ||
            (wire[i].pValue != NULL && wire[i].ulValueLen != 0 && olen > wire[i].ulValueLen)) {
            rv = CKR_DEVICE_ERROR;
            goto out;
        }
    }
    /* A server that marks unavailable values with value_len -1 (p11guard does)
     * lets us tell them from genuinely empty ones; Caml Crush sends 0 for both. */
    int marks_unavailable = 0;
    p11g_dec_init(&d, c.r[1].ptr, c.rep.len - (size_t)(c.r[1].ptr - c.rep.buf));
    for (uint32_t i = 0; i < n; i++) {
        uint64_t type, vlen;
        const uint8_t *p;
        uint32_t olen;
        p11g_tmpl_next(&d, &type, &p, &olen, &vlen);
        marks_unavailable |= vlen == UINT64_MAX;
    }
    /* Pass 2: fill in. */
    rv = mrv;
    p11g_dec_init(&d, c.r[1].ptr, c.rep.len - (size_t)(c.r[1].ptr - c.rep.buf));
    for (uint32_t i = 0; i < n; i++) {
        uint64_t type, vlen;
        const uint8_t *p;
        uint32_t olen;
        CK_ATTRIBUTE *at = &pTemplate[i];
        p11g_tmpl_next(&d, &type, &p, &olen, &vlen);
        if (nested_attr(at->type)) {
            at->ulValueLen = CK_UNAVAILABLE_INFORMATION;
            if (rv == CKR_OK)
                rv = CKR_ATTRIBUTE_TYPE_INVALID;
        } else if (vlen == UINT64_MAX ||
                   (olen == 0 && vlen == 0 && mrv != CKR_OK && !marks_unavailable)) {
            at->ulValueLen = CK_UNAVAILABLE_INFORMATION;
        } else if (at->pValue == NULL || wire[i].pValue == NULL) {
            at->ulValueLen = olen ? olen : (CK_ULONG)vlen;
        } else if (at->ulValueLen == 0) {
            /* An empty buffer went as a length query. */
            if (olen > 0 || vlen > 0) {
                at->ulValueLen = CK_UNAVAILABLE_INFORMATION;
                if (rv == CKR_OK)
                    rv = CKR_BUFFER_TOO_SMALL;
            }
        } else {
            if (olen)
                memcpy(at->pValue, p, olen);
            at->ulValueLen = olen;
        }
    }
out:
    p11g_reply_free(&c.rep);
    free(wire);
    return rv;
}

P11G_EXPORT CK_RV C_SetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                                      CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)
{
    CK_RV rv = check_template(pTemplate, ulCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(3);
    a[0].h = hSession;
    a[1].h = hObject;
    a[2].tmpl = pTemplate;
    a[2].count = ulCount;
    return p11g_simple(P11G_PROC_SetAttributeValue, a);
}

P11G_EXPORT CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                                    CK_ULONG ulCount)
{
    CK_RV rv = check_template(pTemplate, ulCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(2);
    a[0].h = hSession;
    a[1].tmpl = pTemplate;
    a[1].count = ulCount;
    return p11g_simple(P11G_PROC_FindObjectsInit, a);
}

P11G_EXPORT CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject,
                                CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount)
{
    if (phObject == NULL || pulObjectCount == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = hSession;
    a[1].h = ulMaxObjectCount;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_FindObjects, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    uint32_t got = c.r[1].len;
    if (mrv != CKR_OK) {
        rv = mrv;
    } else if (got > ulMaxObjectCount || c.r[2].h != got) {
        rv = CKR_DEVICE_ERROR;
    } else {
        for (uint32_t i = 0; i < got; i++)
            phObject[i] = (CK_OBJECT_HANDLE)p11g_list_get(c.r[1].ptr, i);
        *pulObjectCount = got;
        rv = CKR_OK;
    }
    p11g_reply_free(&c.rep);
    return rv;
}

P11G_EXPORT CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession)
{
    return session_only(P11G_PROC_FindObjectsFinal, hSession);
}

/* ---- encryption ------------------------------------------------------------------ */
P11G_EXPORT CK_RV C_EncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                CK_OBJECT_HANDLE hKey)
{
    return op_init(P11G_PROC_EncryptInit, P11G_FAM_ENCRYPT, hSession, pMechanism, 1, hKey);
}

P11G_EXPORT CK_RV C_Encrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                            CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen)
{
    return data_output(P11G_PROC_Encrypt, P11G_FAM_ENCRYPT, hSession, pData, ulDataLen,
                       pEncryptedData, pulEncryptedDataLen);
}

P11G_EXPORT CK_RV C_EncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                                  CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart,
                                  CK_ULONG_PTR pulEncryptedPartLen)
{
    return data_output(P11G_PROC_EncryptUpdate, P11G_FAM_ENCRYPT, hSession, pPart, ulPartLen,
                       pEncryptedPart, pulEncryptedPartLen);
}

P11G_EXPORT CK_RV C_EncryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart,
                                 CK_ULONG_PTR pulLastEncryptedPartLen)
{
    return final_output(P11G_PROC_EncryptFinal, P11G_FAM_ENCRYPT, hSession, pLastEncryptedPart,
                        pulLastEncryptedPartLen);
}

P11G_EXPORT CK_RV C_DecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                CK_OBJECT_HANDLE hKey)
{
    return op_init(P11G_PROC_DecryptInit, P11G_FAM_DECRYPT, hSession, pMechanism, 1, hKey);
}

P11G_EXPORT CK_RV C_Decrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData,
                            CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData,
                            CK_ULONG_PTR pulDataLen)
{
    return data_output(P11G_PROC_Decrypt, P11G_FAM_DECRYPT, hSession, pEncryptedData,
                       ulEncryptedDataLen, pData, pulDataLen);
}

P11G_EXPORT CK_RV C_DecryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,
                                  CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart,
                                  CK_ULONG_PTR pulPartLen)
{
    return data_output(P11G_PROC_DecryptUpdate, P11G_FAM_DECRYPT, hSession, pEncryptedPart,
                       ulEncryptedPartLen, pPart, pulPartLen);
}

P11G_EXPORT CK_RV C_DecryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart,
                                 CK_ULONG_PTR pulLastPartLen)
{
    return final_output(P11G_PROC_DecryptFinal, P11G_FAM_DECRYPT, hSession, pLastPart,
                        pulLastPartLen);
}

/* ---- digests --------------------------------------------------------------------- */
P11G_EXPORT CK_RV C_DigestInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism)
{
    return op_init(P11G_PROC_DigestInit, P11G_FAM_DIGEST, hSession, pMechanism, 0, 0);
}

P11G_EXPORT CK_RV C_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                           CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen)
{
    return data_output(P11G_PROC_Digest, P11G_FAM_DIGEST, hSession, pData, ulDataLen, pDigest,
                       pulDigestLen);
}

P11G_EXPORT CK_RV C_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
    return session_data(P11G_PROC_DigestUpdate, hSession, pPart, ulPartLen);
}

P11G_EXPORT CK_RV C_DigestKey(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey)
{
    ARGS(2);
    a[0].h = hSession;
    a[1].h = hKey;
    return p11g_simple(P11G_PROC_DigestKey, a);
}

P11G_EXPORT CK_RV C_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest,
                                CK_ULONG_PTR pulDigestLen)
{
    return final_output(P11G_PROC_DigestFinal, P11G_FAM_DIGEST, hSession, pDigest, pulDigestLen);
}

/* ---- signatures ------------------------------------------------------------------ */
P11G_EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                             CK_OBJECT_HANDLE hKey)
{
    return op_init(P11G_PROC_SignInit, P11G_FAM_SIGN, hSession, pMechanism, 1, hKey);
}

P11G_EXPORT CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                         CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)
{
    return data_output(P11G_PROC_Sign, P11G_FAM_SIGN, hSession, pData, ulDataLen, pSignature,
                       pulSignatureLen);
}

P11G_EXPORT CK_RV C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
    return session_data(P11G_PROC_SignUpdate, hSession, pPart, ulPartLen);
}

P11G_EXPORT CK_RV C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                              CK_ULONG_PTR pulSignatureLen)
{
    return final_output(P11G_PROC_SignFinal, P11G_FAM_SIGN, hSession, pSignature,
                        pulSignatureLen);
}

P11G_EXPORT CK_RV C_SignRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                    CK_OBJECT_HANDLE hKey)
{
    return op_init(P11G_PROC_SignRecoverInit, P11G_FAM_SIGN_RECOVER, hSession, pMechanism, 1,
                   hKey);
}

P11G_EXPORT CK_RV C_SignRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                                CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)
{
    return data_output(P11G_PROC_SignRecover, P11G_FAM_SIGN_RECOVER, hSession, pData, ulDataLen,
                       pSignature, pulSignatureLen);
}

P11G_EXPORT CK_RV C_VerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                               CK_OBJECT_HANDLE hKey)
{
    return op_init(P11G_PROC_VerifyInit, P11G_FAM_VERIFY, hSession, pMechanism, 1, hKey);
}

P11G_EXPORT CK_RV C_Verify(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                           CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)
{
    if (bytes_ok(pData, ulDataLen) != CKR_OK || pSignature == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(3);
    a[0].h = hSession;
    a[1].ptr = pData;
    a[1].len = ulDataLen;
    a[2].ptr = pSignature;
    a[2].len = ulSignatureLen;
    return p11g_simple(P11G_PROC_Verify, a);
}

P11G_EXPORT CK_RV C_VerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
    return session_data(P11G_PROC_VerifyUpdate, hSession, pPart, ulPartLen);
}

P11G_EXPORT CK_RV C_VerifyFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                                CK_ULONG ulSignatureLen)
{
    if (pSignature == NULL)
        return CKR_ARGUMENTS_BAD;
    return session_data(P11G_PROC_VerifyFinal, hSession, pSignature, ulSignatureLen);
}

P11G_EXPORT CK_RV C_VerifyRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                      CK_OBJECT_HANDLE hKey)
{
    return op_init(P11G_PROC_VerifyRecoverInit, P11G_FAM_VERIFY_RECOVER, hSession, pMechanism, 1,
                   hKey);
}

P11G_EXPORT CK_RV C_VerifyRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                                  CK_ULONG ulSignatureLen, CK_BYTE_PTR pData,
                                  CK_ULONG_PTR pulDataLen)
{
    if (pSignature == NULL)
        return CKR_ARGUMENTS_BAD;
    return data_output(P11G_PROC_VerifyRecover, P11G_FAM_VERIFY_RECOVER, hSession, pSignature,
                       ulSignatureLen, pData, pulDataLen);
}

/* ---- dual-function ----------------------------------------------------------------- */
P11G_EXPORT CK_RV C_DigestEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                                        CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart,
                                        CK_ULONG_PTR pulEncryptedPartLen)
{
    return data_output(P11G_PROC_DigestEncryptUpdate, P11G_FAM_DIGEST | P11G_FAM_ENCRYPT,
                       hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen);
}

P11G_EXPORT CK_RV C_DecryptDigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,
                                        CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart,
                                        CK_ULONG_PTR pulPartLen)
{
    return data_output(P11G_PROC_DecryptDigestUpdate, P11G_FAM_DECRYPT | P11G_FAM_DIGEST,
                       hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen);
}

P11G_EXPORT CK_RV C_SignEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                                      CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart,
                                      CK_ULONG_PTR pulEncryptedPartLen)
{
    return data_output(P11G_PROC_SignEncryptUpdate, P11G_FAM_SIGN | P11G_FAM_ENCRYPT, hSession,
                       pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen);
}

P11G_EXPORT CK_RV C_DecryptVerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,
                                        CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart,
                                        CK_ULONG_PTR pulPartLen)
{
    return data_output(P11G_PROC_DecryptVerifyUpdate, P11G_FAM_DECRYPT | P11G_FAM_VERIFY,
                       hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen);
}

/* ---- keys -------------------------------------------------------------------------- */
P11G_EXPORT CK_RV C_GenerateKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                                CK_OBJECT_HANDLE_PTR phKey)
{
    CK_MECHANISM mech;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    if (phKey == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_mech(pMechanism, &mech, &oaep);
    if (rv == CKR_OK)
        rv = check_template(pTemplate, ulCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(3);
    a[0].h = hSession;
    a[1].mech = &mech;
    a[2].tmpl = pTemplate;
    a[2].count = ulCount;
    return handle_result(P11G_PROC_GenerateKey, a, phKey);
}

P11G_EXPORT CK_RV C_GenerateKeyPair(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                    CK_ATTRIBUTE_PTR pPublicKeyTemplate,
                                    CK_ULONG ulPublicKeyAttributeCount,
                                    CK_ATTRIBUTE_PTR pPrivateKeyTemplate,
                                    CK_ULONG ulPrivateKeyAttributeCount,
                                    CK_OBJECT_HANDLE_PTR phPublicKey,
                                    CK_OBJECT_HANDLE_PTR phPrivateKey)
{
    CK_MECHANISM mech;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    if (phPublicKey == NULL || phPrivateKey == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_mech(pMechanism, &mech, &oaep);
    if (rv == CKR_OK)
        rv = check_template(pPublicKeyTemplate, ulPublicKeyAttributeCount);
    if (rv == CKR_OK)
        rv = check_template(pPrivateKeyTemplate, ulPrivateKeyAttributeCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(4);
    a[0].h = hSession;
    a[1].mech = &mech;
    a[2].tmpl = pPublicKeyTemplate;
    a[2].count = ulPublicKeyAttributeCount;
    a[3].tmpl = pPrivateKeyTemplate;
    a[3].count = ulPrivateKeyAttributeCount;
    struct p11g_result c;
    CK_RV mrv;
    rv = p11g_run(P11G_PROC_GenerateKeyPair, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        *phPublicKey = (CK_OBJECT_HANDLE)c.r[1].h;
        *phPrivateKey = (CK_OBJECT_HANDLE)c.r[2].h;
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

P11G_EXPORT CK_RV C_WrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                            CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey,
                            CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen)
{
    CK_MECHANISM mech;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    if (pulWrappedKeyLen == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_mech(pMechanism, &mech, &oaep);
    if (rv != CKR_OK)
        return rv;
    ARGS(4);
    a[0].h = hSession;
    a[1].mech = &mech;
    a[2].h = hWrappingKey;
    a[3].h = hKey;
    uint64_t key = p11g_hash(0, &mech.mechanism, sizeof mech.mechanism);
    key = p11g_hash(key, mech.pParameter, mech.pParameter ? mech.ulParameterLen : 0);
    key = p11g_hash(key, &hWrappingKey, sizeof hWrappingKey);
    key = p11g_hash(key, &hKey, sizeof hKey);
    return output_call(P11G_PROC_WrapKey, P11G_FAM_OTHER, hSession, key, a, pWrappedKey,
                       pulWrappedKeyLen);
}

P11G_EXPORT CK_RV C_UnwrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                              CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey,
                              CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate,
                              CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey)
{
    CK_MECHANISM mech;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    if (phKey == NULL || pWrappedKey == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_mech(pMechanism, &mech, &oaep);
    if (rv == CKR_OK)
        rv = check_template(pTemplate, ulAttributeCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(5);
    a[0].h = hSession;
    a[1].mech = &mech;
    a[2].h = hUnwrappingKey;
    a[3].ptr = pWrappedKey;
    a[3].len = ulWrappedKeyLen;
    a[4].tmpl = pTemplate;
    a[4].count = ulAttributeCount;
    return handle_result(P11G_PROC_UnwrapKey, a, phKey);
}

P11G_EXPORT CK_RV C_DeriveKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                              CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate,
                              CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey)
{
    CK_MECHANISM mech;
    CK_RSA_PKCS_OAEP_PARAMS oaep;
    if (phKey == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_mech(pMechanism, &mech, &oaep);
    if (rv == CKR_OK)
        rv = check_template(pTemplate, ulAttributeCount);
    if (rv != CKR_OK)
        return rv;
    ARGS(4);
    a[0].h = hSession;
    a[1].mech = &mech;
    a[2].h = hBaseKey;
    a[3].tmpl = pTemplate;
    a[3].count = ulAttributeCount;
    return handle_result(P11G_PROC_DeriveKey, a, phKey);
}

/* ---- random, legacy ---------------------------------------------------------------- */
P11G_EXPORT CK_RV C_SeedRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen)
{
    if (pSeed == NULL)
        return CKR_ARGUMENTS_BAD;
    return session_data(P11G_PROC_SeedRandom, hSession, pSeed, ulSeedLen);
}

P11G_EXPORT CK_RV C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData,
                                   CK_ULONG ulRandomLen)
{
    if (RandomData == NULL)
        return CKR_ARGUMENTS_BAD;
    ARGS(2);
    a[0].h = hSession;
    a[1].h = ulRandomLen;
    struct p11g_result c;
    CK_RV mrv;
    CK_RV rv = p11g_run(P11G_PROC_GenerateRandom, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (mrv == CKR_OK) {
        /* Exactly the requested length, or nothing: short random is a bug. */
        if (c.r[1].len != ulRandomLen)
            mrv = CKR_DEVICE_ERROR;
        else if (ulRandomLen)
            memcpy(RandomData, c.r[1].ptr, ulRandomLen);
    }
    p11g_reply_free(&c.rep);
    return mrv;
}

P11G_EXPORT CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE hSession)
{
    return session_only(P11G_PROC_GetFunctionStatus, hSession);
}

P11G_EXPORT CK_RV C_CancelFunction(CK_SESSION_HANDLE hSession)
{
    return session_only(P11G_PROC_CancelFunction, hSession);
}
