/* lists.c: the 2.40 and 3.0 function lists, and the PKCS#11 3.0 functions.
 * Protocol v3 cannot carry any 3.0 call, so they answer
 * CKR_FUNCTION_NOT_SUPPORTED (after the argument checks that cost nothing). */
#include "p11g.h"

#define NS return CKR_FUNCTION_NOT_SUPPORTED

P11G_EXPORT CK_RV C_LoginUser(CK_SESSION_HANDLE s, CK_USER_TYPE u, CK_UTF8CHAR_PTR pin,
                              CK_ULONG pinlen, CK_UTF8CHAR_PTR user, CK_ULONG userlen)
{
    (void)s, (void)u, (void)pin, (void)pinlen, (void)user, (void)userlen;
    NS;
}
P11G_EXPORT CK_RV C_SessionCancel(CK_SESSION_HANDLE s, CK_FLAGS f)
{
    (void)s, (void)f;
    NS;
}
#define MSG_INIT(name)                                                                         \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)         \
    {                                                                                          \
        (void)s, (void)m, (void)k;                                                             \
        NS;                                                                                    \
    }
#define MSG_FINAL(name)                                                                        \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s)                                                \
    {                                                                                          \
        (void)s;                                                                               \
        NS;                                                                                    \
    }
MSG_INIT(C_MessageEncryptInit)
MSG_INIT(C_MessageDecryptInit)
MSG_INIT(C_MessageSignInit)
MSG_INIT(C_MessageVerifyInit)
MSG_FINAL(C_MessageEncryptFinal)
MSG_FINAL(C_MessageDecryptFinal)
MSG_FINAL(C_MessageSignFinal)
MSG_FINAL(C_MessageVerifyFinal)

#define CRYPT_MSG(name)                                                                        \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR ad,     \
                           CK_ULONG adl, CK_BYTE_PTR in, CK_ULONG inl, CK_BYTE_PTR out,        \
                           CK_ULONG_PTR outl)                                                  \
    {                                                                                          \
        (void)s, (void)p, (void)pl, (void)ad, (void)adl, (void)in, (void)inl, (void)out,       \
            (void)outl;                                                                        \
        NS;                                                                                    \
    }
CRYPT_MSG(C_EncryptMessage)
CRYPT_MSG(C_DecryptMessage)
#define CRYPT_BEGIN(name)                                                                      \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR ad,     \
                           CK_ULONG adl)                                                       \
    {                                                                                          \
        (void)s, (void)p, (void)pl, (void)ad, (void)adl;                                       \
        NS;                                                                                    \
    }
CRYPT_BEGIN(C_EncryptMessageBegin)
CRYPT_BEGIN(C_DecryptMessageBegin)
#define CRYPT_NEXT(name)                                                                       \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR in,     \
                           CK_ULONG inl, CK_BYTE_PTR out, CK_ULONG_PTR outl, CK_FLAGS f)       \
    {                                                                                          \
        (void)s, (void)p, (void)pl, (void)in, (void)inl, (void)out, (void)outl, (void)f;       \
        NS;                                                                                    \
    }
CRYPT_NEXT(C_EncryptMessageNext)
CRYPT_NEXT(C_DecryptMessageNext)
#define SIGN_MSG(name)                                                                         \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR d,      \
                           CK_ULONG dl, CK_BYTE_PTR sig, CK_ULONG_PTR sigl)                    \
    {                                                                                          \
        (void)s, (void)p, (void)pl, (void)d, (void)dl, (void)sig, (void)sigl;                  \
        NS;                                                                                    \
    }
SIGN_MSG(C_SignMessage)
SIGN_MSG(C_SignMessageNext)
#define VERIFY_MSG(name)                                                                       \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl, CK_BYTE_PTR d,      \
                           CK_ULONG dl, CK_BYTE_PTR sig, CK_ULONG sigl)                        \
    {                                                                                          \
        (void)s, (void)p, (void)pl, (void)d, (void)dl, (void)sig, (void)sigl;                  \
        NS;                                                                                    \
    }
VERIFY_MSG(C_VerifyMessage)
VERIFY_MSG(C_VerifyMessageNext)
#define MSG_BEGIN(name)                                                                        \
    P11G_EXPORT CK_RV name(CK_SESSION_HANDLE s, CK_VOID_PTR p, CK_ULONG pl)                     \
    {                                                                                          \
        (void)s, (void)p, (void)pl;                                                            \
        NS;                                                                                    \
    }
MSG_BEGIN(C_SignMessageBegin)
MSG_BEGIN(C_VerifyMessageBegin)

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
