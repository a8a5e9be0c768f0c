/* lists.c: the 2.40 and 3.0 function lists, and the PKCS#11 3.0 functions.
 *
 * Over protocol version 4 the 3.0 functions are forwarded (procedures 72-93,
 * docs/protocol.md §6); the server answers CKR_FUNCTION_NOT_SUPPORTED for what
 * the backend module lacks or the policy hides.  Protocol version 3 (Caml
 * Crush) cannot carry any of them: CKR_FUNCTION_NOT_SUPPORTED, after the
 * argument checks that cost nothing.
 *
 * Per-message parameters are in/out: the module may generate the IV and
 * writes the GCM tag or the CCM MAC, so the buffers that come back are copied
 * into the caller's structure (never beyond the sizes it gave). */
#include <string.h>

#include "p11g.h"
#include "p11g_procs.h"
#include "v4.h"

#define NS CKR_FUNCTION_NOT_SUPPORTED

static int bytes_bad(const void *p, CK_ULONG n) { return p == NULL && n != 0; }

P11G_EXPORT CK_RV C_LoginUser(CK_SESSION_HANDLE s, CK_USER_TYPE u, CK_UTF8CHAR_PTR pin,
                              CK_ULONG pinlen, CK_UTF8CHAR_PTR user, CK_ULONG userlen)
{
    if (bytes_bad(pin, pinlen) || bytes_bad(user, userlen))
        return CKR_ARGUMENTS_BAD;
    if (p11g_proto() != 4)
        return NS;
    struct p11g_arg a[4];
    memset(a, 0, sizeof a);
    a[0].h = s;
    a[1].h = u;
    a[2].ptr = pin;
    a[2].len = pinlen;
    a[3].ptr = user;
    a[3].len = userlen;
    return p11g_simple(P11G_PROC_LoginUser, a);
}

P11G_EXPORT CK_RV C_SessionCancel(CK_SESSION_HANDLE s, CK_FLAGS f)
{
    if (p11g_proto() != 4)
        return NS;
    struct p11g_arg a[2];
    memset(a, 0, sizeof a);
    a[0].h = s;
    a[1].h = f;
    return p11g_simple(P11G_PROC_SessionCancel, a);
}

static CK_RV message_init(unsigned proc, CK_SESSION_HANDLE s, CK_MECHANISM_PTR m,
                          CK_OBJECT_HANDLE k)
{
    if (m == NULL)
        return CKR_ARGUMENTS_BAD;
    if (p11g_proto() != 4)
        return NS;
    CK_RV rv = p11g_v4_mech_check(m);
    if (rv != CKR_OK)
        return rv;
    struct p11g_arg a[3];
    memset(a, 0, sizeof a);
    a[0].h = s;
    a[1].mech = m;
    a[2].h = k;
    return p11g_simple(proc, a);
}

static CK_RV message_final(unsigned proc, CK_SESSION_HANDLE s)
{
    if (p11g_proto() != 4)
        return NS;
    struct p11g_arg a[1];
    memset(a, 0, sizeof a);
    a[0].h = s;
    return p11g_simple(proc, a);
}

#define MSG_INIT(name, proc)                                                                   \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)         \
    {                                                                                          \
        return message_init(proc, s, m, k);                                                    \
    }
#define MSG_FINAL(name, proc)                                                                  \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s) { return message_final(proc, s); }
MSG_INIT(C_MessageEncryptInit, P11G_PROC_MessageEncryptInit)
MSG_INIT(C_MessageDecryptInit, P11G_PROC_MessageDecryptInit)
MSG_INIT(C_MessageSignInit, P11G_PROC_MessageSignInit)
MSG_INIT(C_MessageVerifyInit, P11G_PROC_MessageVerifyInit)
MSG_FINAL(C_MessageEncryptFinal, P11G_PROC_MessageEncryptFinal)
MSG_FINAL(C_MessageDecryptFinal, P11G_PROC_MessageDecryptFinal)
MSG_FINAL(C_MessageSignFinal, P11G_PROC_MessageSignFinal)
MSG_FINAL(C_MessageVerifyFinal, P11G_PROC_MessageVerifyFinal)

/* Fills a[1] (the per-message parameter) or returns why not. */
static CK_RV param_arg(struct p11g_arg *a, CK_VOID_PTR p, CK_ULONG pl, int encrypting)
{
    unsigned tag;
    CK_RV rv = p11g_v4_param_tag(p, pl, &tag);
    if (rv != CKR_OK)
        return rv;
    a->h = tag;
    a->ptr = p;
    a->len = pl;
    /* The tag or MAC is the module's output when encrypting: send zeros,
     * not whatever the caller's buffer holds. */
    a->tmpl_mode = encrypting ? P11G_V4_ZERO_OUT : 0;
    return CKR_OK;
}

/* The arguments every message function starts with, after the protocol check:
 * the session (a[0]) and the per-message parameter (a[1]); the other n - 2
 * start zeroed for the caller to fill. */
static CK_RV message_args(struct p11g_arg *a, size_t n, CK_SESSION_HANDLE s, CK_VOID_PTR p,
                          CK_ULONG pl, int encrypting)
{
    if (p11g_proto() != 4)
        return NS;
    memset(a, 0, n * sizeof *a);
    a[0].h = s;
    return param_arg(&a[1], p, pl, encrypting);
}

/* The parameter that came back (result index 1), when the call succeeded. */
static CK_RV param_back(const struct p11g_result *c, const struct p11g_arg *pa, CK_VOID_PTR p,
                        CK_ULONG pl)
{
    if (c->rep.version != 4)
        return CKR_DEVICE_ERROR;
    return p11g_v4_param_back((unsigned)pa->h, p, pl, c->r[1].ptr, c->r[1].len);
}

/* EncryptMessage / DecryptMessage: H Y O O H -> H Y O H */
static CK_RV crypt_message(unsigned proc, int encrypting, CK_SESSION_HANDLE s, CK_VOID_PTR p,
                           CK_ULONG pl, CK_BYTE_PTR ad, CK_ULONG adl, CK_BYTE_PTR in,
                           CK_ULONG inl, CK_BYTE_PTR out, CK_ULONG_PTR outl)
{
    if (outl == NULL || bytes_bad(ad, adl) || bytes_bad(in, inl))
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[5];
    CK_RV rv = message_args(a, 5, s, p, pl, encrypting);
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = ad;
    a[2].len = adl;
    a[3].ptr = in;
    a[3].len = inl;
    a[4].h = out != NULL ? (uint64_t)*outl : P11G_OUT_LEN_NULL;
    struct p11g_result c;
    CK_RV mrv;
    rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    rv = CKR_OK;
    if (mrv == CKR_OK && out != NULL)
        rv = param_back(&c, &a[1], p, pl);
    if (rv == CKR_OK)
        rv = p11g_v4_output(&c.rep, &c.r[2], &c.r[3], mrv, out, outl);
    p11g_reply_free(&c.rep);
    return rv;
}

#define CRYPT_MSG(name, proc, enc)                                                             \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR ad,     \
                           CK_ULONG adl, CK_BYTE_PTR in, CK_ULONG inl, CK_BYTE_PTR out,        \
                           CK_ULONG_PTR outl)                                                  \
    {                                                                                          \
        return crypt_message(proc, enc, s, p, pl, ad, adl, in, inl, out, outl);                \
    }
CRYPT_MSG(C_EncryptMessage, P11G_PROC_EncryptMessage, 1)
CRYPT_MSG(C_DecryptMessage, P11G_PROC_DecryptMessage, 0)

/* EncryptMessageBegin / DecryptMessageBegin: H Y O -> H Y */
static CK_RV crypt_begin(unsigned proc, int encrypting, CK_SESSION_HANDLE s, CK_VOID_PTR p,
                         CK_ULONG pl, CK_BYTE_PTR ad, CK_ULONG adl)
{
    if (bytes_bad(ad, adl))
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[3];
    CK_RV rv = message_args(a, 3, s, p, pl, encrypting);
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = ad;
    a[2].len = adl;
    struct p11g_result c;
    CK_RV mrv;
    rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    rv = mrv == CKR_OK ? param_back(&c, &a[1], p, pl) : mrv;
    p11g_reply_free(&c.rep);
    return rv;
}

#define CRYPT_BEGIN(name, proc, enc)                                                           \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR ad,     \
                           CK_ULONG adl)                                                       \
    {                                                                                          \
        return crypt_begin(proc, enc, s, p, pl, ad, adl);                                      \
    }
CRYPT_BEGIN(C_EncryptMessageBegin, P11G_PROC_EncryptMessageBegin, 1)
CRYPT_BEGIN(C_DecryptMessageBegin, P11G_PROC_DecryptMessageBegin, 0)

/* EncryptMessageNext / DecryptMessageNext: H Y O H(out_len) H(flags) -> H Y O H */
static CK_RV crypt_next(unsigned proc, int encrypting, CK_SESSION_HANDLE s, CK_VOID_PTR p,
                        CK_ULONG pl, CK_BYTE_PTR in, CK_ULONG inl, CK_BYTE_PTR out,
                        CK_ULONG_PTR outl, CK_FLAGS flags)
{
    if (outl == NULL || bytes_bad(in, inl))
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[5];
    CK_RV rv = message_args(a, 5, s, p, pl, encrypting && (flags & CKF_END_OF_MESSAGE));
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = in;
    a[2].len = inl;
    a[3].h = out != NULL ? (uint64_t)*outl : P11G_OUT_LEN_NULL;
    a[4].h = flags;
    struct p11g_result c;
    CK_RV mrv;
    rv = p11g_run(proc, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    rv = CKR_OK;
    if (mrv == CKR_OK && out != NULL)
        rv = param_back(&c, &a[1], p, pl);
    if (rv == CKR_OK)
        rv = p11g_v4_output(&c.rep, &c.r[2], &c.r[3], mrv, out, outl);
    p11g_reply_free(&c.rep);
    return rv;
}

#define CRYPT_NEXT(name, proc, enc)                                                            \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR in,     \
                           CK_ULONG inl, CK_BYTE_PTR out, CK_ULONG_PTR outl, CK_FLAGS f)       \
    {                                                                                          \
        return crypt_next(proc, enc, s, p, pl, in, inl, out, outl, f);                         \
    }
CRYPT_NEXT(C_EncryptMessageNext, P11G_PROC_EncryptMessageNext, 1)
CRYPT_NEXT(C_DecryptMessageNext, P11G_PROC_DecryptMessageNext, 0)

/* SignMessage: H Y O H(out_len) -> H O H */
P11G_EXPORT CK_RV C_SignMessage(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR d,
                                CK_ULONG dl, CK_BYTE_PTR sig, CK_ULONG_PTR sigl)
{
    if (sigl == NULL || bytes_bad(d, dl))
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[4];
    CK_RV rv = message_args(a, 4, s, p, pl, 0);
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = d;
    a[2].len = dl;
    a[3].h = sig != NULL ? (uint64_t)*sigl : P11G_OUT_LEN_NULL;
    struct p11g_result c;
    CK_RV mrv;
    rv = p11g_run(P11G_PROC_SignMessage, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    rv = p11g_v4_output(&c.rep, &c.r[1], &c.r[2], mrv, sig, sigl);
    p11g_reply_free(&c.rep);
    return rv;
}

/* SignMessageNext: H Y O H(final) H(out_len) -> H O H; not final when
 * pulSignatureLen is NULL. */
P11G_EXPORT CK_RV C_SignMessageNext(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl,
                                    CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR sig,
                                    CK_ULONG_PTR sigl)
{
    if (bytes_bad(d, dl))
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[5];
    CK_RV rv = message_args(a, 5, s, p, pl, 0);
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = d;
    a[2].len = dl;
    a[3].h = sigl != NULL;
    a[4].h = sigl != NULL && sig != NULL ? (uint64_t)*sigl : P11G_OUT_LEN_NULL;
    struct p11g_result c;
    CK_RV mrv;
    rv = p11g_run(P11G_PROC_SignMessageNext, a, &c, &mrv);
    if (rv != CKR_OK)
        return rv;
    if (sigl != NULL)
        rv = p11g_v4_output(&c.rep, &c.r[1], &c.r[2], mrv, sig, sigl);
    else
        rv = mrv;
    p11g_reply_free(&c.rep);
    return rv;
}

/* SignMessageBegin / VerifyMessageBegin: H Y -> H */
static CK_RV message_begin(unsigned proc, CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl)
{
    struct p11g_arg a[2];
    CK_RV rv = message_args(a, 2, s, p, pl, 0);
    if (rv != CKR_OK)
        return rv;
    return p11g_simple(proc, a);
}

P11G_EXPORT CK_RV C_SignMessageBegin(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl)
{
    return message_begin(P11G_PROC_SignMessageBegin, s, p, pl);
}

P11G_EXPORT CK_RV C_VerifyMessageBegin(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl)
{
    return message_begin(P11G_PROC_VerifyMessageBegin, s, p, pl);
}

/* VerifyMessage: H Y O O -> H */
P11G_EXPORT CK_RV C_VerifyMessage(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR d,
                                  CK_ULONG dl, CK_BYTE_PTR sig, CK_ULONG sigl)
{
    if (bytes_bad(d, dl) || sig == NULL)
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[4];
    CK_RV rv = message_args(a, 4, s, p, pl, 0);
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = d;
    a[2].len = dl;
    a[3].ptr = sig;
    a[3].len = sigl;
    return p11g_simple(P11G_PROC_VerifyMessage, a);
}

/* VerifyMessageNext: H Y O H(final) O(signature) -> H; final when pSignature
 * is given. */
P11G_EXPORT CK_RV C_VerifyMessageNext(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl,
                                      CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR sig,
                                      CK_ULONG sigl)
{
    if (bytes_bad(d, dl))
        return CKR_ARGUMENTS_BAD;
    struct p11g_arg a[5];
    CK_RV rv = message_args(a, 5, s, p, pl, 0);
    if (rv != CKR_OK)
        return rv;
    a[2].ptr = d;
    a[2].len = dl;
    a[3].h = sig != NULL;
    a[4].ptr = sig;
    a[4].len = sig != NULL ? sigl : 0;
    return p11g_simple(P11G_PROC_VerifyMessageNext, a);
}

#define FUNCTIONS_2_40                                                                         \
    C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList, C_GetSlotList, C_GetSlotInfo,      \
        C_GetTokenInfo, C_GetMechanismList, C_GetMechanismInfo, C_InitToken, C_InitPIN,        \
        C_SetPIN, C_OpenSession, C_CloseSession, C_CloseAllSessions, C_GetSessionInfo,         \
        C_GetOperationState, C_SetOperationState, C_Login, C_Logout, C_CreateObject,           \
        C_CopyObject, C_DestroyObject, C_GetObjectSize, C_GetAttributeValue,                   \
        C_SetAttributeValue, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal,             \
        C_EncryptInit, C_Encrypt, C_EncryptUpdate, C_EncryptFinal, C_DecryptInit, C_Decrypt,   \
        C_DecryptUpdate, C_DecryptFinal, C_DigestInit, C_Digest, C_DigestUpdate, C_DigestKey,  \
        C_DigestFinal, C_SignInit, C_Sign, C_SignUpdate, C_SignFinal, C_SignRecoverInit,       \
        C_SignRecover, C_VerifyInit, C_Verify, C_VerifyUpdate, C_VerifyFinal,                  \
        C_VerifyRecoverInit, C_VerifyRecover, C_DigestEncryptUpdate, C_DecryptDigestUpdate,    \
        C_SignEncryptUpdate, C_DecryptVerifyUpdate, C_GenerateKey, C_GenerateKeyPair,          \
        C_WrapKey, C_UnwrapKey, C_DeriveKey, C_SeedRandom, C_GenerateRandom,                   \
        C_GetFunctionStatus, C_CancelFunction, C_WaitForSlotEvent

CK_FUNCTION_LIST p11g_function_list = {{2, 40}, FUNCTIONS_2_40};

CK_FUNCTION_LIST_3_0 p11g_function_list_3_0 = {
    {3, 0},
    FUNCTIONS_2_40,
    C_GetInterfaceList,
    C_GetInterface,
    C_LoginUser,
    C_SessionCancel,
    C_MessageEncryptInit,
    C_EncryptMessage,
    C_EncryptMessageBegin,
    C_EncryptMessageNext,
    C_MessageEncryptFinal,
    C_MessageDecryptInit,
    C_DecryptMessage,
    C_DecryptMessageBegin,
    C_DecryptMessageNext,
    C_MessageDecryptFinal,
    C_MessageSignInit,
    C_SignMessage,
    C_SignMessageBegin,
    C_SignMessageNext,
    C_MessageSignFinal,
    C_MessageVerifyInit,
    C_VerifyMessage,
    C_VerifyMessageBegin,
    C_VerifyMessageNext,
    C_MessageVerifyFinal,
};
