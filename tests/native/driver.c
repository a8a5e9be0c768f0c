/* driver.c: exercises a PKCS#11 module (libp11guard.so) for the tests.
 *
 *   driver MODULE init       C_Initialize + C_GetSlotList, print both rvs
 *   driver MODULE args       NULL / too-small arguments on every function (needs a token
 *                            labelled $P11G_TOKEN with user PIN $P11G_PIN)
 *   driver MODULE storm N    N calls of every kind against a hostile server; only survival counts
 *   driver MODULE restart    waits on stdin while the test kills/restarts the server
 *   driver MODULE fork       fork with and without C_Initialize in the child
 *   driver MODULE threads T N  T threads x N digests on their own sessions, results checked
 *   driver MODULE pair R     R rounds of two concurrent calls (needs the Reorder server)
 *   driver MODULE bench T S  T threads doing RSA-2048 SHA256 signs for S seconds
 *   driver MODULE chanlife T N  T threads x N digests, kept across a fork, C_Finalize and
 *                            C_Initialize in the main thread (their channels' life cycle)
 *
 * Prints "FAIL ..." lines and exits non-zero on any unexpected result. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pkcs11_3.h"

static CK_FUNCTION_LIST *F;
static void *H;
static int failures;

#define EXPECT(call, want)                                                                     \
    do {                                                                                       \
        CK_RV rv_ = (call);                                                                    \
        if (rv_ != (CK_RV)(want)) {                                                            \
            printf("FAIL line %d: %s -> 0x%lx, want 0x%lx\n", __LINE__, #call,                 \
                   (unsigned long)rv_, (unsigned long)(want));                                 \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)
#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            printf("FAIL line %d: %s\n", __LINE__, #cond);                                     \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

static const char *env(const char *k, const char *dflt)
{
    const char *v = getenv(k);
    return v && *v ? v : dflt;
}

static CK_SLOT_ID find_slot(void)
{
    CK_SLOT_ID slots[16];
    CK_ULONG n = 16;
    const char *label = env("P11G_TOKEN", "test");
    if (F->C_GetSlotList(CK_TRUE, slots, &n) != CKR_OK)
        return (CK_SLOT_ID)-1;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO ti;
        if (F->C_GetTokenInfo(slots[i], &ti) != CKR_OK)
            continue;
        size_t l = strlen(label);
        if (memcmp(ti.label, label, l) == 0 && (l == 32 || ti.label[l] == ' '))
            return slots[i];
    }
    return (CK_SLOT_ID)-1;
}

static CK_SESSION_HANDLE open_login(CK_SLOT_ID slot, int login)
{
    CK_SESSION_HANDLE s = 0;
    if (F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s) != CKR_OK)
        return 0;
    if (login) {
        const char *pin = env("P11G_PIN", "1234");
        CK_RV rv = F->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
            return 0;
    }
    return s;
}

static CK_OBJECT_HANDLE make_aes(CK_SESSION_HANDLE s)
{
    CK_MECHANISM m = {CKM_AES_KEY_GEN, NULL, 0};
    CK_ULONG len = 32;
    CK_BBOOL t = CK_TRUE, f = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {{CKA_VALUE_LEN, &len, sizeof len}, {CKA_ENCRYPT, &t, 1},
                           {CKA_DECRYPT, &t, 1},          {CKA_TOKEN, &f, 1},
                           {CKA_EXTRACTABLE, &t, 1},      {CKA_SENSITIVE, &f, 1}};
    CK_OBJECT_HANDLE k = 0;
    EXPECT(F->C_GenerateKey(s, &m, tmpl, 6, &k), CKR_OK);
    return k;
}

static void make_ec(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv)
{
    static CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    CK_MECHANISM m = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_BBOOL t = CK_TRUE, f = CK_FALSE;
    CK_ATTRIBUTE pt[] = {{CKA_EC_PARAMS, p256, sizeof p256}, {CKA_VERIFY, &t, 1},
                         {CKA_TOKEN, &f, 1}};
    CK_ATTRIBUTE kt[] = {{CKA_SIGN, &t, 1}, {CKA_TOKEN, &f, 1}, {CKA_PRIVATE, &t, 1}};
    EXPECT(F->C_GenerateKeyPair(s, &m, pt, 3, kt, 3, pub, priv), CKR_OK);
}

/* ---- args: local argument checks and length queries --------------------------- */
static int cmd_args(void)
{
    CK_RV rv;
    CK_C_INITIALIZE_ARGS bad = {0};
    bad.pReserved = &bad;
    CK_INFO info0;
    EXPECT(F->C_GetInfo(&info0), CKR_CRYPTOKI_NOT_INITIALIZED);
    EXPECT(F->C_Finalize(NULL), CKR_CRYPTOKI_NOT_INITIALIZED);
    EXPECT(F->C_Initialize(&bad), CKR_ARGUMENTS_BAD);
    CK_C_INITIALIZE_ARGS half = {0};
    half.CreateMutex = (CK_CREATEMUTEX)(void *)cmd_args;
    EXPECT(F->C_Initialize(&half), CKR_ARGUMENTS_BAD);
    CK_C_INITIALIZE_ARGS os = {0};
    os.flags = CKF_OS_LOCKING_OK;
    EXPECT(F->C_Initialize(&os), CKR_OK);
    EXPECT(F->C_Initialize(NULL), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    EXPECT(F->C_Finalize(&bad), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GetFunctionList(NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GetInfo(NULL), CKR_ARGUMENTS_BAD);

    /* slot lists: NULL count, query, count 0 with a buffer (Caml Crush segfaults) */
    CK_ULONG n = 0;
    CK_SLOT_ID slots[8];
    EXPECT(F->C_GetSlotList(CK_FALSE, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GetSlotList(CK_FALSE, NULL, &n), CKR_OK);
    CK_ULONG total = n;
    CHECK(total >= 2);
    n = 0;
    EXPECT(F->C_GetSlotList(CK_FALSE, slots, &n), CKR_BUFFER_TOO_SMALL);
    CHECK(n == total);
    n = 1;
    EXPECT(F->C_GetSlotList(CK_FALSE, slots, &n), CKR_BUFFER_TOO_SMALL);
    CHECK(n == total);
    CK_SLOT_ID slot = find_slot();
    CHECK(slot != (CK_SLOT_ID)-1);
    EXPECT(F->C_GetSlotInfo(slot, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GetTokenInfo(slot, NULL), CKR_ARGUMENTS_BAD);
    CK_TOKEN_INFO ti;
    EXPECT(F->C_GetTokenInfo(slot, &ti), CKR_OK);
    EXPECT(F->C_GetMechanismList(slot, NULL, NULL), CKR_ARGUMENTS_BAD);
    n = 0;
    EXPECT(F->C_GetMechanismList(slot, NULL, &n), CKR_OK);
    CHECK(n > 10);
    CK_ULONG nm = n;
    CK_MECHANISM_TYPE mechs[2];
    n = 2;
    EXPECT(F->C_GetMechanismList(slot, mechs, &n), CKR_BUFFER_TOO_SMALL);
    CHECK(n == nm);
    CK_MECHANISM_TYPE *all = calloc(nm, sizeof *all);
    n = nm;
    EXPECT(F->C_GetMechanismList(slot, all, &n), CKR_OK);
    free(all);
    EXPECT(F->C_GetMechanismInfo(slot, CKM_SHA256, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_InitToken(slot, (CK_UTF8CHAR_PTR) "5678", 4, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_WaitForSlotEvent(CKF_DONT_BLOCK, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, &n), CKR_ARGUMENTS_BAD);

    /* sessions */
    CK_SESSION_HANDLE s;
    EXPECT(F->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_OpenSession(slot, 0, NULL, NULL, &s), CKR_SESSION_PARALLEL_NOT_SUPPORTED);
    EXPECT(F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), CKR_OK);
    EXPECT(F->C_Login(s, CKU_USER, NULL, 4), CKR_ARGUMENTS_BAD);
    const char *pin = env("P11G_PIN", "1234");
    EXPECT(F->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)), CKR_OK);
    EXPECT(F->C_GetSessionInfo(s, NULL), CKR_ARGUMENTS_BAD);
    CK_SESSION_INFO si;
    EXPECT(F->C_GetSessionInfo(s, &si), CKR_OK);
    CHECK(si.slotID == slot && si.state == CKS_RW_USER_FUNCTIONS);
    EXPECT(F->C_SetPIN(s, NULL, 4, (CK_UTF8CHAR_PTR) "1234", 4), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_InitPIN(s, NULL, 4), CKR_ARGUMENTS_BAD);

    /* objects and templates */
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL fls = CK_FALSE;
    char label[] = "p11g-data";
    CK_BYTE value[] = "some data value";
    CK_ATTRIBUTE dt[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &fls, 1},
                         {CKA_LABEL, label, sizeof label - 1}, {CKA_VALUE, value, sizeof value}};
    CK_OBJECT_HANDLE obj = 0;
    EXPECT(F->C_CreateObject(s, NULL, 1, &obj), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_CreateObject(s, dt, 4, NULL), CKR_ARGUMENTS_BAD);
    CK_ATTRIBUTE nullval = {CKA_LABEL, NULL, 5};
    EXPECT(F->C_CreateObject(s, &nullval, 1, &obj), CKR_ATTRIBUTE_VALUE_INVALID);
    EXPECT(F->C_CreateObject(s, dt, 4, &obj), CKR_OK);
    EXPECT(F->C_GetObjectSize(s, obj, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GetAttributeValue(s, obj, NULL, 1), CKR_ARGUMENTS_BAD);
    CK_ATTRIBUTE q[2] = {{CKA_LABEL, NULL, 0}, {CKA_VALUE, NULL, 0}};
    EXPECT(F->C_GetAttributeValue(s, obj, q, 2), CKR_OK);
    CHECK(q[0].ulValueLen == sizeof label - 1 && q[1].ulValueLen == sizeof value);
    char small[4] = {0}, big[64];
    memset(big, 0x5a, sizeof big);
    CK_ATTRIBUTE g[2] = {{CKA_LABEL, small, sizeof small}, {CKA_VALUE, big, sizeof big}};
    rv = F->C_GetAttributeValue(s, obj, g, 2);
    CHECK(rv == CKR_BUFFER_TOO_SMALL);
    CHECK(g[0].ulValueLen == CK_UNAVAILABLE_INFORMATION);
    CHECK(g[1].ulValueLen == sizeof value && memcmp(big, value, sizeof value) == 0);
    CK_ATTRIBUTE zero = {CKA_LABEL, small, 0};
    EXPECT(F->C_GetAttributeValue(s, obj, &zero, 1), CKR_BUFFER_TOO_SMALL);
    CHECK(zero.ulValueLen == CK_UNAVAILABLE_INFORMATION);
    char exact[sizeof label - 1];
    CK_ATTRIBUTE ex = {CKA_LABEL, exact, sizeof exact};
    EXPECT(F->C_GetAttributeValue(s, obj, &ex, 1), CKR_OK);
    CHECK(memcmp(exact, label, sizeof exact) == 0);
    CK_ATTRIBUTE invalid = {0x7fff0001UL, NULL, 0};
    EXPECT(F->C_GetAttributeValue(s, obj, &invalid, 1), CKR_ATTRIBUTE_TYPE_INVALID);
    CHECK(invalid.ulValueLen == CK_UNAVAILABLE_INFORMATION);

    EXPECT(F->C_FindObjectsInit(s, NULL, 1), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_FindObjectsInit(s, &dt[2], 1), CKR_OK);
    CK_OBJECT_HANDLE found[4];
    CK_ULONG nf = 0;
    EXPECT(F->C_FindObjects(s, NULL, 4, &nf), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_FindObjects(s, found, 4, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_FindObjects(s, found, 4, &nf), CKR_OK);
    CHECK(nf == 1 && found[0] == obj);
    EXPECT(F->C_FindObjectsFinal(s), CKR_OK);

    /* mechanisms that cannot travel in protocol v3 */
    CK_OBJECT_HANDLE aes = make_aes(s);
    CK_BYTE iv[16] = {0}, aad[4] = {0};
    struct { CK_BYTE_PTR pIv; CK_ULONG ulIvLen, ulIvBits; CK_BYTE_PTR pAAD; CK_ULONG ulAADLen, ulTagBits; }
        gcm = {iv, 12, 96, aad, 4, 128};
    CK_MECHANISM mg = {CKM_AES_GCM, &gcm, sizeof gcm};
    /* Protocol v3 (Caml Crush) cannot carry it; v4 (p11guard) can: then end
     * the operation so that the checks below start from a clean session. */
    rv = F->C_EncryptInit(s, &mg, aes);
    CHECK(rv == CKR_MECHANISM_PARAM_INVALID || rv == CKR_OK);
    if (rv == CKR_OK) {
        CK_BYTE gin[16] = {0}, gout[64];
        CK_ULONG gl = sizeof gout;
        EXPECT(F->C_Encrypt(s, gin, sizeof gin, gout, &gl), CKR_OK);
        CHECK(gl == sizeof gin + 16);
    }
    EXPECT(F->C_EncryptInit(s, NULL, aes), CKR_ARGUMENTS_BAD);
    CK_MECHANISM nullparam = {CKM_AES_CBC, NULL, 16};
    EXPECT(F->C_EncryptInit(s, &nullparam, aes), CKR_MECHANISM_PARAM_INVALID);

    /* length queries run the operation once: Encrypt */
    CK_MECHANISM cbc = {CKM_AES_CBC_PAD, iv, sizeof iv};
    CK_BYTE pt[20] = "twenty bytes of text", ct[64], ct2[64];
    CK_ULONG cl;
    EXPECT(F->C_EncryptInit(s, &cbc, aes), CKR_OK);
    EXPECT(F->C_Encrypt(s, pt, sizeof pt, NULL, NULL), CKR_ARGUMENTS_BAD);
    cl = 0;
    EXPECT(F->C_Encrypt(s, pt, sizeof pt, NULL, &cl), CKR_OK);
    CHECK(cl == 32);
    EXPECT(F->C_EncryptInit(s, &cbc, aes), CKR_OPERATION_ACTIVE);
    cl = 8;
    EXPECT(F->C_Encrypt(s, pt, sizeof pt, ct, &cl), CKR_BUFFER_TOO_SMALL);
    CHECK(cl == 32);
    cl = sizeof ct;
    EXPECT(F->C_Encrypt(s, pt, sizeof pt, ct, &cl), CKR_OK);
    CHECK(cl == 32);
    cl = sizeof ct2;
    EXPECT(F->C_Encrypt(s, pt, sizeof pt, ct2, &cl), CKR_OPERATION_NOT_INITIALIZED);
    /* same result without a query */
    EXPECT(F->C_EncryptInit(s, &cbc, aes), CKR_OK);
    cl = sizeof ct2;
    EXPECT(F->C_Encrypt(s, pt, sizeof pt, ct2, &cl), CKR_OK);
    CHECK(cl == 32 && memcmp(ct, ct2, 32) == 0);
    /* Decrypt with a multi-part query */
    CK_BYTE back[64];
    CK_ULONG bl = 0, total_back = 0;
    EXPECT(F->C_DecryptInit(s, &cbc, aes), CKR_OK);
    EXPECT(F->C_DecryptUpdate(s, ct, 32, NULL, &bl), CKR_OK);
    CK_ULONG want = bl;
    EXPECT(F->C_DecryptUpdate(s, ct, 32, back, &bl), CKR_OK);
    CHECK(bl == want);
    total_back = bl;
    bl = 0;
    EXPECT(F->C_DecryptFinal(s, NULL, &bl), CKR_OK);
    CK_ULONG fin = bl;
    EXPECT(F->C_DecryptFinal(s, back + total_back, &bl), CKR_OK);
    CHECK(bl <= fin); /* a length query may answer an upper bound (C allows it) */
    total_back += bl;
    CHECK(total_back == sizeof pt && memcmp(back, pt, sizeof pt) == 0);

    /* Sign/Verify with EC, query then fetch */
    CK_OBJECT_HANDLE pub = 0, priv = 0;
    make_ec(s, &pub, &priv);
    CK_MECHANISM ecdsa = {CKM_ECDSA, NULL, 0};
    CK_BYTE hash[32] = {1, 2, 3}, sig[128];
    CK_ULONG sl = 0;
    EXPECT(F->C_SignInit(s, &ecdsa, priv), CKR_OK);
    EXPECT(F->C_Sign(s, hash, sizeof hash, NULL, &sl), CKR_OK);
    CHECK(sl == 64);
    sl = 10;
    EXPECT(F->C_Sign(s, hash, sizeof hash, sig, &sl), CKR_BUFFER_TOO_SMALL);
    sl = sizeof sig;
    EXPECT(F->C_Sign(s, hash, sizeof hash, sig, &sl), CKR_OK);
    EXPECT(F->C_VerifyInit(s, &ecdsa, pub), CKR_OK);
    EXPECT(F->C_Verify(s, hash, sizeof hash, NULL, sl), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_Verify(s, hash, sizeof hash, sig, sl), CKR_OK);
    EXPECT(F->C_VerifyInit(s, &ecdsa, pub), CKR_OK);
    sig[3] ^= 1;
    EXPECT(F->C_Verify(s, hash, sizeof hash, sig, sl), CKR_SIGNATURE_INVALID);

    /* digest */
    CK_MECHANISM sha = {CKM_SHA256, NULL, 0};
    CK_BYTE dg[32];
    CK_ULONG dl = 0;
    EXPECT(F->C_DigestInit(s, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_DigestInit(s, &sha), CKR_OK);
    EXPECT(F->C_DigestUpdate(s, NULL, 3), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_DigestUpdate(s, (CK_BYTE_PTR) "abc", 3), CKR_OK);
    EXPECT(F->C_DigestFinal(s, NULL, &dl), CKR_OK);
    CHECK(dl == 32);
    EXPECT(F->C_DigestFinal(s, dg, &dl), CKR_OK);
    static const CK_BYTE abc256[4] = {0xba, 0x78, 0x16, 0xbf};
    CHECK(memcmp(dg, abc256, 4) == 0);

    /* everything else with NULL outputs */
    CK_OBJECT_HANDLE hk;
    CK_MECHANISM kg = {CKM_AES_KEY_GEN, NULL, 0};
    EXPECT(F->C_GenerateKey(s, &kg, NULL, 0, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GenerateKeyPair(s, &kg, NULL, 0, NULL, 0, NULL, &hk), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_WrapKey(s, &cbc, aes, aes, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_UnwrapKey(s, &cbc, aes, NULL, 16, NULL, 0, &hk), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_DeriveKey(s, &kg, aes, NULL, 0, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GenerateRandom(s, NULL, 16), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_SeedRandom(s, NULL, 16), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_GetOperationState(s, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_SetOperationState(s, NULL, 4, 0, 0), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_VerifyFinal(s, NULL, 4), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_VerifyRecover(s, NULL, 4, NULL, &dl), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_SignRecover(s, hash, 4, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_DigestEncryptUpdate(s, hash, 4, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_DecryptDigestUpdate(s, hash, 4, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_SignEncryptUpdate(s, hash, 4, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_DecryptVerifyUpdate(s, hash, 4, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(F->C_EncryptFinal(s, NULL, NULL), CKR_ARGUMENTS_BAD);
    CK_BYTE rnd[300];
    EXPECT(F->C_GenerateRandom(s, rnd, sizeof rnd), CKR_OK);

    /* 3.0 entry points */
    CK_ULONG ni = 0;
    CK_INTERFACE_PTR ifp = NULL;
    P11G_C_GetInterfaceList gil = (P11G_C_GetInterfaceList)dlsym(H, "C_GetInterfaceList");
    P11G_C_GetInterface gi = (P11G_C_GetInterface)dlsym(H, "C_GetInterface");
    CHECK(gil != NULL && gi != NULL);
    if (gil != NULL && gi != NULL) {
        EXPECT(gil(NULL, NULL), CKR_ARGUMENTS_BAD);
        EXPECT(gil(NULL, &ni), CKR_OK);
        CHECK(ni == 2);
        CK_INTERFACE ifs[2];
        ni = 1;
        EXPECT(gil(ifs, &ni), CKR_BUFFER_TOO_SMALL);
        ni = 2;
        EXPECT(gil(ifs, &ni), CKR_OK);
        EXPECT(gi(NULL, NULL, NULL, 0), CKR_ARGUMENTS_BAD);
        CK_VERSION v30 = {3, 0};
        EXPECT(gi((CK_UTF8CHAR_PTR) "PKCS 11", &v30, &ifp, 0), CKR_OK);
        if (ifp != NULL) {
            CK_FUNCTION_LIST_3_0 *f3 = ifp->pFunctionList;
            CHECK(f3->version.major == 3);
            EXPECT(f3->C_SessionCancel(s, 0), CKR_FUNCTION_NOT_SUPPORTED);
            EXPECT(f3->C_MessageEncryptInit(s, &cbc, aes), CKR_FUNCTION_NOT_SUPPORTED);
            CK_INTERFACE_PTR again = NULL;
            EXPECT(f3->C_GetInterface(NULL, NULL, &again, 0), CKR_OK);
            CHECK(again != NULL && ((CK_VERSION *)again->pFunctionList)->major == 2);
        }
        CK_VERSION v99 = {9, 9};
        EXPECT(gi((CK_UTF8CHAR_PTR) "PKCS 11", &v99, &ifp, 0), CKR_ARGUMENTS_BAD);
    }

    EXPECT(F->C_CloseSession(s), CKR_OK);
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    EXPECT(F->C_Finalize(NULL), CKR_CRYPTOKI_NOT_INITIALIZED);
    EXPECT(F->C_GetSlotList(CK_FALSE, NULL, &n), CKR_CRYPTOKI_NOT_INITIALIZED);
    printf("args done, %d failures\n", failures);
    return failures ? 1 : 0;
}

/* ---- storm: every function against a hostile server; only survival counts -------- */
static int cmd_storm(long iterations)
{
    /* buf is also sent (C_Verify's signature): initialised, so valgrind sees
     * only what the library itself does with memory. */
    CK_BYTE buf[512] = {0}, in[64] = {1, 2, 3};
    CK_ULONG len, n;
    CK_SLOT_ID slots[4];
    CK_INFO info;
    CK_SLOT_INFO sinfo;
    CK_TOKEN_INFO tinfo;
    CK_SESSION_INFO ssinfo;
    CK_MECHANISM_INFO minfo;
    CK_OBJECT_HANDLE objs[4], h1, h2;
    CK_MECHANISM mech = {CKM_SHA256_RSA_PKCS, NULL, 0};
    char lbl[32];
    memset(lbl, ' ', sizeof lbl);
    CK_BYTE v1[8] = {1}, v2[16] = {2}, v3[3] = {3};
    CK_ULONG calls = 0;
    /* Protocol v4 replies: per-message parameters and nested templates. */
    CK_FUNCTION_LIST_3_0 *F3 = NULL;
    CK_INTERFACE_PTR iface = NULL;
    CK_VERSION v30 = {3, 0};
    P11G_C_GetInterface gi = (P11G_C_GetInterface)dlsym(H, "C_GetInterface");
    if (gi != NULL && gi((CK_UTF8CHAR_PTR) "PKCS 11", &v30, &iface, 0) == CKR_OK)
        F3 = iface->pFunctionList;
    CK_BYTE iv[12] = {0}, tag[16] = {0}, ibuf1[8], ibuf2[8];
    struct {
        CK_BYTE_PTR pIv;
        CK_ULONG ulIvLen, ulIvFixedBits, ivGenerator;
        CK_BYTE_PTR pTag;
        CK_ULONG ulTagBits;
    } gcmmsg = {iv, sizeof iv, 0, 0, tag, 128};
    F->C_Initialize(NULL);
    for (long i = 0; i < iterations; i++) {
        CK_RV rv = 0;
        CK_ATTRIBUTE t[3] = {{CKA_LABEL, v1, sizeof v1}, {CKA_VALUE, v2, sizeof v2},
                             {CKA_ID, NULL, 0}};
        (void)v3;
        len = sizeof buf;
        n = 4;
        CK_ATTRIBUTE inner[2] = {{CKA_KEY_TYPE, ibuf1, sizeof ibuf1},
                                 {CKA_LABEL, ibuf2, sizeof ibuf2}};
        CK_ATTRIBUTE outer = {CKA_WRAP_TEMPLATE, inner, sizeof inner};
        switch (i % 44) {
        case 0: rv = F->C_GetInfo(&info); break;
        case 1: rv = F->C_GetSlotList(CK_TRUE, slots, &n); break;
        case 2: rv = F->C_GetSlotList(CK_FALSE, NULL, &n); break;
        case 3: rv = F->C_GetSlotInfo(1, &sinfo); break;
        case 4: rv = F->C_GetTokenInfo(1, &tinfo); break;
        case 5: rv = F->C_GetMechanismList(1, objs, &n); break;
        case 6: rv = F->C_GetMechanismInfo(1, CKM_SHA256, &minfo); break;
        case 7: rv = F->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &h1); break;
        case 8: rv = F->C_GetSessionInfo(1, &ssinfo); break;
        case 9: rv = F->C_Login(1, CKU_USER, (CK_UTF8CHAR_PTR) "1234", 4); break;
        case 10: rv = F->C_GetAttributeValue(1, 2, t, 3); break;
        case 11: rv = F->C_FindObjectsInit(1, t, 2); break;
        case 12: rv = F->C_FindObjects(1, objs, 4, &n); break;
        case 13: rv = F->C_SignInit(1, &mech, 2); break;
        case 14: rv = F->C_Sign(1, in, sizeof in, buf, &len); break;
        case 15: len = 0; rv = F->C_Sign(1, in, sizeof in, NULL, &len); break;
        case 16: len = 3; rv = F->C_Sign(1, in, sizeof in, buf, &len); break;
        case 17: rv = F->C_Encrypt(1, in, sizeof in, buf, &len); break;
        case 18: rv = F->C_Decrypt(1, in, sizeof in, buf, &len); break;
        case 19: rv = F->C_Digest(1, in, sizeof in, buf, &len); break;
        case 20: rv = F->C_DigestFinal(1, buf, &len); break;
        case 21: rv = F->C_GenerateRandom(1, buf, 100); break;
        case 22: rv = F->C_WrapKey(1, &mech, 2, 3, buf, &len); break;
        case 23: rv = F->C_GenerateKeyPair(1, &mech, t, 2, t, 2, &h1, &h2); break;
        case 24: rv = F->C_GenerateKey(1, &mech, t, 2, &h1); break;
        case 25: rv = F->C_CreateObject(1, t, 2, &h1); break;
        case 26: rv = F->C_GetObjectSize(1, 2, &n); break;
        case 27: rv = F->C_EncryptUpdate(1, in, 16, buf, &len); break;
        case 28: rv = F->C_GetOperationState(1, buf, &len); break;
        case 29: rv = F->C_VerifyRecover(1, in, 16, buf, &len); break;
        case 30: rv = F->C_WaitForSlotEvent(CKF_DONT_BLOCK, slots, NULL); break;
        case 31: rv = F->C_InitToken(1, (CK_UTF8CHAR_PTR) "5678", 4, (CK_UTF8CHAR_PTR)lbl); break;
        case 32: rv = F->C_Verify(1, in, 16, buf, 16); break;
        case 33: rv = F->C_CloseSession(1); break;
        case 34: rv = F->C_DecryptVerifyUpdate(1, in, 16, buf, &len); break;
        case 35: rv = F->C_UnwrapKey(1, &mech, 2, in, 16, t, 2, &h1); break;
        case 36: rv = F->C_DeriveKey(1, &mech, 2, t, 2, &h1); break;
        case 37: rv = F->C_SeedRandom(1, in, 8); break;
        case 38: rv = F->C_Finalize(NULL); break;
        case 39: rv = F->C_Initialize(NULL); break;
        case 40:
            if (F3 != NULL)
                rv = F3->C_EncryptMessage(1, &gcmmsg, sizeof gcmmsg, in, 4, in, 16, buf, &len);
            break;
        case 41:
            if (F3 != NULL)
                rv = F3->C_DecryptMessageBegin(1, &gcmmsg, sizeof gcmmsg, in, 4);
            break;
        case 42: rv = F->C_GetAttributeValue(1, 2, &outer, 1); break;
        case 43:
            if (F3 != NULL)
                rv = F3->C_SignMessage(1, NULL, 0, in, 16, buf, &len);
            break;
        }
        calls++;
        if (len > sizeof buf && rv == CKR_OK && (i % 44) != 15) {
            printf("FAIL: reported length %lu beyond the buffer with CKR_OK\n", len);
            failures++;
        }
        if (rv == CKR_DEVICE_ERROR || rv == CKR_CRYPTOKI_NOT_INITIALIZED) {
            F->C_Finalize(NULL);
            F->C_Initialize(NULL);
        }
    }
    F->C_Finalize(NULL);
    printf("storm done %lu calls, %d failures\n", calls, failures);
    return failures ? 1 : 0;
}

/* ---- restart: the test kills the server while we wait -------------------------- */
static int cmd_restart(void)
{
    char line[64];
    CK_BYTE r[16];
    EXPECT(F->C_Initialize(NULL), CKR_OK);
    CK_SLOT_ID slot = find_slot();
    CK_SESSION_HANDLE s = open_login(slot, 0);
    CHECK(s != 0);
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_OK);
    printf("READY1\n");
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL)
        return 2;
    /* server killed: calls fail cleanly, again and again */
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_DEVICE_ERROR);
    EXPECT(F->C_GetInfo(&(CK_INFO){0}), CKR_DEVICE_ERROR);
    printf("READY2\n");
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL)
        return 2;
    /* server restarted: C_Initialize again (no Finalize first) reconnects */
    EXPECT(F->C_Initialize(NULL), CKR_OK);
    slot = find_slot();
    s = open_login(slot, 1);
    CHECK(s != 0);
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_OK);
    /* and the Finalize / Initialize path works too */
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    EXPECT(F->C_Initialize(NULL), CKR_OK);
    s = open_login(find_slot(), 0);
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_OK);
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    printf("restart done, %d failures\n", failures);
    return failures ? 1 : 0;
}

/* ---- fork ----------------------------------------------------------------------- */
static int child_work(int init_first)
{
    CK_ULONG n = 0;
    CK_BYTE r[16];
    if (!init_first)
        EXPECT(F->C_GetSlotList(CK_FALSE, NULL, &n), CKR_CRYPTOKI_NOT_INITIALIZED);
    EXPECT(F->C_Initialize(NULL), CKR_OK);
    EXPECT(F->C_GetSlotList(CK_FALSE, NULL, &n), CKR_OK);
    CK_SESSION_HANDLE s = open_login(find_slot(), 0);
    CHECK(s != 0);
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_OK);
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    return failures;
}

static int run_child(int init_first)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0)
        _exit(child_work(init_first) ? 1 : 0);
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 99;
}

static int cmd_fork(void)
{
    CK_BYTE r[16];
    /* 1. fork before anything */
    CHECK(run_child(1) == 0);
    /* 2. parent initialised with a session; child does and does not C_Initialize */
    EXPECT(F->C_Initialize(NULL), CKR_OK);
    CK_SESSION_HANDLE s = open_login(find_slot(), 1);
    CHECK(s != 0);
    CHECK(run_child(0) == 0);
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_OK); /* parent's connection intact */
    CHECK(run_child(1) == 0);
    CK_SESSION_INFO si;
    EXPECT(F->C_GetSessionInfo(s, &si), CKR_OK);
    CHECK(si.state == CKS_RW_USER_FUNCTIONS);
    /* 3. a child that exits without touching the module */
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    waitpid(pid, NULL, 0);
    EXPECT(F->C_GenerateRandom(s, r, sizeof r), CKR_OK);
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    printf("fork done, %d failures\n", failures);
    return failures ? 1 : 0;
}

/* ---- threads: concurrent calls on separate sessions, results checked ----------- */
struct tharg {
    CK_SLOT_ID slot;
    long n;
    int idx;
    int bad;
    double seconds;
    CK_OBJECT_HANDLE key;
    long done;
};

/* n digests on session s, each also computed in two parts; how many went wrong. */
static int digest_burst(CK_SESSION_HANDLE s, int idx, long n)
{
    CK_MECHANISM sha = {CKM_SHA256, NULL, 0};
    int bad = 0;
    for (long i = 0; i < n; i++) {
        CK_BYTE data[64], d1[32], d2[32];
        CK_ULONG l1 = sizeof d1, l2 = sizeof d2;
        memset(data, idx, sizeof data);
        data[0] = (CK_BYTE)i;
        size_t len = 1 + (size_t)((i * 7 + idx) % 63);
        if (F->C_DigestInit(s, &sha) != CKR_OK || F->C_Digest(s, data, len, d1, &l1) != CKR_OK)
            bad++;
        /* the same digest in two parts must agree */
        if (F->C_DigestInit(s, &sha) != CKR_OK || F->C_DigestUpdate(s, data, 1) != CKR_OK ||
            F->C_DigestUpdate(s, data + 1, len - 1) != CKR_OK ||
            F->C_DigestFinal(s, d2, &l2) != CKR_OK || l1 != 32 || l2 != 32 ||
            memcmp(d1, d2, 32) != 0)
            bad++;
    }
    return bad;
}

static void *digest_thread(void *p)
{
    struct tharg *a = p;
    CK_SESSION_HANDLE s = open_login(a->slot, 0);
    if (s == 0) {
        a->bad++;
        return NULL;
    }
    a->bad += digest_burst(s, a->idx, a->n);
    F->C_CloseSession(s);
    return NULL;
}

static int cmd_threads(int nthreads, long n)
{
    pthread_t th[64];
    struct tharg args[64];
    CK_C_INITIALIZE_ARGS ia = {0};
    ia.flags = CKF_OS_LOCKING_OK;
    EXPECT(F->C_Initialize(&ia), CKR_OK);
    CK_SLOT_ID slot = find_slot();
    int bad = 0;
    if (nthreads > 64)
        nthreads = 64;
    for (int i = 0; i < nthreads; i++) {
        args[i] = (struct tharg){.slot = slot, .n = n, .idx = i};
        pthread_create(&th[i], NULL, digest_thread, &args[i]);
    }
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        bad += args[i].bad;
    }
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    CHECK(bad == 0);
    printf("threads done, %d bad results, %d failures\n", bad, failures);
    return failures ? 1 : 0;
}

/* ---- pair: two calls in flight at once (against hostile_server.Reorder) -------- */
static void *random_thread(void *p)
{
    struct tharg *a = p;
    CK_BYTE buf[64];
    CK_ULONG n = (CK_ULONG)(16 + 16 * a->idx);
    memset(buf, 0xee, sizeof buf);
    if (F->C_GenerateRandom(1, buf, n) != CKR_OK)
        a->bad++;
    for (CK_ULONG i = 0; i < n; i++)
        if (buf[i] != (CK_BYTE)n)
            a->bad++;
    return NULL;
}

static int cmd_pair(int rounds)
{
    CK_C_INITIALIZE_ARGS ia = {0};
    ia.flags = CKF_OS_LOCKING_OK;
    EXPECT(F->C_Initialize(&ia), CKR_OK);
    int bad = 0;
    for (int r = 0; r < rounds; r++) {
        pthread_t th[2];
        struct tharg args[2];
        for (int i = 0; i < 2; i++) {
            args[i] = (struct tharg){.idx = i};
            pthread_create(&th[i], NULL, random_thread, &args[i]);
        }
        for (int i = 0; i < 2; i++) {
            pthread_join(th[i], NULL);
            bad += args[i].bad;
        }
    }
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    CHECK(bad == 0);
    printf("pair done, %d bad, %d failures\n", bad, failures);
    return failures ? 1 : 0;
}

/* ---- bench: RSA-2048 signs from T threads --------------------------------------- */
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *sign_thread(void *p)
{
    struct tharg *a = p;
    CK_SESSION_HANDLE s = open_login(a->slot, 0);
    CK_MECHANISM m = {CKM_SHA256_RSA_PKCS, NULL, 0};
    CK_BYTE data[32] = {7}, sig[512];
    if (s == 0) {
        a->bad++;
        return NULL;
    }
    double end = now_s() + a->seconds;
    while (now_s() < end) {
        CK_ULONG sl = sizeof sig;
        if (F->C_SignInit(s, &m, a->key) != CKR_OK || F->C_Sign(s, data, sizeof data, sig, &sl) != CKR_OK) {
            a->bad++;
            break;
        }
        a->done++;
    }
    F->C_CloseSession(s);
    return NULL;
}

static int cmd_bench(int nthreads, double seconds)
{
    CK_C_INITIALIZE_ARGS ia = {0};
    ia.flags = CKF_OS_LOCKING_OK;
    EXPECT(F->C_Initialize(&ia), CKR_OK);
    CK_SLOT_ID slot = find_slot();
    CK_SESSION_HANDLE s = open_login(slot, 1);
    CK_MECHANISM gen = {CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_ULONG bits = 2048;
    CK_BYTE e[] = {1, 0, 1};
    CK_BBOOL t = CK_TRUE, f = CK_FALSE;
    CK_ATTRIBUTE pt[] = {{CKA_MODULUS_BITS, &bits, sizeof bits}, {CKA_PUBLIC_EXPONENT, e, 3},
                         {CKA_TOKEN, &f, 1}};
    CK_ATTRIBUTE kt[] = {{CKA_SIGN, &t, 1}, {CKA_TOKEN, &f, 1}, {CKA_PRIVATE, &t, 1}};
    CK_OBJECT_HANDLE pub, priv;
    EXPECT(F->C_GenerateKeyPair(s, &gen, pt, 3, kt, 3, &pub, &priv), CKR_OK);
    pthread_t th[64];
    struct tharg args[64];
    if (nthreads > 64)
        nthreads = 64;
    long total = 0;
    int bad = 0;
    double t0 = now_s();
    for (int i = 0; i < nthreads; i++) {
        args[i] = (struct tharg){.slot = slot, .seconds = seconds, .key = priv, .idx = i};
        pthread_create(&th[i], NULL, sign_thread, &args[i]);
    }
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        total += args[i].done;
        bad += args[i].bad;
    }
    double el = now_s() - t0;
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    printf("bench threads=%d signs=%ld seconds=%.2f rate=%.1f bad=%d\n", nthreads, total, el,
           total / el, bad);
    return (failures || bad) ? 1 : 0;
}

/* ---- chanlife: threads keep their channels across a fork, C_Finalize, C_Initialize -- */
static pthread_barrier_t g_phase;
static void *chanlife_thread(void *p)
{
    struct tharg *a = p;
    CK_SESSION_HANDLE s = open_login(a->slot, 0);
    a->bad += s == 0;
    a->bad += digest_burst(s, a->idx, a->n); /* overlapping calls: channels open */
    pthread_barrier_wait(&g_phase);          /* main forks a child that uses the module */
    pthread_barrier_wait(&g_phase);
    a->bad += digest_burst(s, a->idx, a->n); /* the parent's channels still work */
    pthread_barrier_wait(&g_phase);          /* main: C_Finalize, C_Initialize */
    pthread_barrier_wait(&g_phase);
    s = open_login(a->slot, 0);              /* sessions went with C_Finalize */
    a->bad += s == 0;
    a->bad += digest_burst(s, a->idx, a->n); /* on new channels (or the new connection) */
    F->C_CloseSession(s);
    return NULL;
}

static int cmd_chanlife(int nthreads, long n)
{
    pthread_t th[16];
    struct tharg args[16];
    CK_C_INITIALIZE_ARGS ia = {0};
    ia.flags = CKF_OS_LOCKING_OK;
    if (nthreads > 16)
        nthreads = 16;
    EXPECT(F->C_Initialize(&ia), CKR_OK);
    CK_SLOT_ID slot = find_slot();
    pthread_barrier_init(&g_phase, NULL, (unsigned)nthreads + 1);
    for (int i = 0; i < nthreads; i++) {
        args[i] = (struct tharg){.slot = slot, .n = n, .idx = i};
        pthread_create(&th[i], NULL, chanlife_thread, &args[i]);
    }
    pthread_barrier_wait(&g_phase);
    CHECK(run_child(1) == 0); /* a child: its own connection, the parent's untouched */
    pthread_barrier_wait(&g_phase);
    pthread_barrier_wait(&g_phase);
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    EXPECT(F->C_Initialize(&ia), CKR_OK);
    pthread_barrier_wait(&g_phase);
    int bad = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        bad += args[i].bad;
    }
    EXPECT(F->C_Finalize(NULL), CKR_OK);
    pthread_barrier_destroy(&g_phase);
    CHECK(bad == 0);
    printf("chanlife done, %d bad results, %d failures\n", bad, failures);
    return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: driver MODULE args|storm N|restart|fork|threads T N|bench T S\n");
        return 2;
    }
    H = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (H == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(H, "C_GetFunctionList");
    if (gfl == NULL || gfl(&F) != CKR_OK)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *cmd = argv[2];
    if (strcmp(cmd, "init") == 0) {
        CK_RV rv = F->C_Initialize(NULL);
        CK_ULONG n = 0;
        CK_RV rv2 = F->C_GetSlotList(CK_FALSE, NULL, &n);
        printf("init rv=0x%lx slotlist rv=0x%lx\n", (unsigned long)rv, (unsigned long)rv2);
        if (rv == CKR_OK)
            F->C_Finalize(NULL);
        return 0;
    }
    if (strcmp(cmd, "args") == 0)
        return cmd_args();
    if (strcmp(cmd, "storm") == 0)
        return cmd_storm(argc > 3 ? atol(argv[3]) : 2000);
    if (strcmp(cmd, "restart") == 0)
        return cmd_restart();
    if (strcmp(cmd, "fork") == 0)
        return cmd_fork();
    if (strcmp(cmd, "threads") == 0)
        return cmd_threads(argc > 3 ? atoi(argv[3]) : 4, argc > 4 ? atol(argv[4]) : 100);
    if (strcmp(cmd, "pair") == 0)
        return cmd_pair(argc > 3 ? atoi(argv[3]) : 50);
    if (strcmp(cmd, "chanlife") == 0)
        return cmd_chanlife(argc > 3 ? atoi(argv[3]) : 3, argc > 4 ? atol(argv[4]) : 200);
    if (strcmp(cmd, "bench") == 0)
        return cmd_bench(argc > 3 ? atoi(argv[3]) : 1, argc > 4 ? atof(argv[4]) : 5.0);
    fprintf(stderr, "unknown command %s\n", cmd);
    return 2;
}
