"""The C declarations the cffi binding needs (PKCS#11 2.40 + 3.0, Unix ABI).

Written from the standard's type definitions.  On Unix a CK_ULONG is an
``unsigned long`` and the structures use the platform's natural alignment
(no packing), which is what cffi's ABI mode computes.

Input byte buffers are declared ``char *`` rather than ``unsigned char *``:
the two are ABI-identical, and cffi passes a Python ``bytes`` object to a
``char *`` parameter without copying it, which matters on the hot path.

The function list structures are generated from ``SIGNATURES`` so that the
order of the pointers (which *is* the ABI) is written down exactly once.
"""

from __future__ import annotations

from typing import Final

TYPES: Final[str] = """
typedef unsigned char CK_BYTE;
typedef unsigned char CK_BBOOL;
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_FLAGS;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_ULONG CK_MECHANISM_TYPE;
typedef CK_ULONG CK_ATTRIBUTE_TYPE;
typedef CK_ULONG CK_USER_TYPE;
typedef CK_ULONG CK_NOTIFICATION;

typedef struct CK_VERSION { CK_BYTE major; CK_BYTE minor; } CK_VERSION;

typedef struct CK_INFO {
    CK_VERSION cryptokiVersion;
    CK_BYTE manufacturerID[32];
    CK_FLAGS flags;
    CK_BYTE libraryDescription[32];
    CK_VERSION libraryVersion;
} CK_INFO;

typedef struct CK_SLOT_INFO {
    CK_BYTE slotDescription[64];
    CK_BYTE manufacturerID[32];
    CK_FLAGS flags;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
} CK_SLOT_INFO;

typedef struct CK_TOKEN_INFO {
    CK_BYTE label[32];
    CK_BYTE manufacturerID[32];
    CK_BYTE model[16];
    CK_BYTE serialNumber[16];
    CK_FLAGS flags;
    CK_ULONG ulMaxSessionCount;
    CK_ULONG ulSessionCount;
    CK_ULONG ulMaxRwSessionCount;
    CK_ULONG ulRwSessionCount;
    CK_ULONG ulMaxPinLen;
    CK_ULONG ulMinPinLen;
    CK_ULONG ulTotalPublicMemory;
    CK_ULONG ulFreePublicMemory;
    CK_ULONG ulTotalPrivateMemory;
    CK_ULONG ulFreePrivateMemory;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
    CK_BYTE utcTime[16];
} CK_TOKEN_INFO;

typedef struct CK_SESSION_INFO {
    CK_SLOT_ID slotID;
    CK_ULONG state;
    CK_FLAGS flags;
    CK_ULONG ulDeviceError;
} CK_SESSION_INFO;

typedef struct CK_ATTRIBUTE {
    CK_ATTRIBUTE_TYPE type;
    void *pValue;
    CK_ULONG ulValueLen;
} CK_ATTRIBUTE;

typedef struct CK_MECHANISM {
    CK_MECHANISM_TYPE mechanism;
    void *pParameter;
    CK_ULONG ulParameterLen;
} CK_MECHANISM;

typedef struct CK_MECHANISM_INFO {
    CK_ULONG ulMinKeySize;
    CK_ULONG ulMaxKeySize;
    CK_FLAGS flags;
} CK_MECHANISM_INFO;

typedef struct CK_C_INITIALIZE_ARGS {
    void *CreateMutex;
    void *DestroyMutex;
    void *LockMutex;
    void *UnlockMutex;
    CK_FLAGS flags;
    void *pReserved;
} CK_C_INITIALIZE_ARGS;

typedef struct CK_INTERFACE {
    char *pInterfaceName;
    void *pFunctionList;
    CK_FLAGS flags;
} CK_INTERFACE;

typedef CK_RV (*CK_NOTIFY)(CK_SESSION_HANDLE, CK_NOTIFICATION, void *);
"""

_S = "CK_SESSION_HANDLE hSession"
_DATA_OUT = f"{_S}, char *pIn, CK_ULONG ulInLen, char *pOut, CK_ULONG *pulOutLen"
_FINAL_OUT = f"{_S}, char *pOut, CK_ULONG *pulOutLen"
_MECH_KEY = f"{_S}, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey"
_DATA_IN = f"{_S}, char *pPart, CK_ULONG ulPartLen"
_PARAM = "void *pParameter, CK_ULONG ulParameterLen"

# (function name, C parameter list) in CK_FUNCTION_LIST(_3_0) order.
SIGNATURES_240: Final[tuple[tuple[str, str], ...]] = (
    ("C_Initialize", "void *pInitArgs"),
    ("C_Finalize", "void *pReserved"),
    ("C_GetInfo", "CK_INFO *pInfo"),
    ("C_GetFunctionList", "void *ppFunctionList"),
    ("C_GetSlotList", "CK_BBOOL tokenPresent, CK_SLOT_ID *pSlotList, CK_ULONG *pulCount"),
    ("C_GetSlotInfo", "CK_SLOT_ID slotID, CK_SLOT_INFO *pInfo"),
    ("C_GetTokenInfo", "CK_SLOT_ID slotID, CK_TOKEN_INFO *pInfo"),
    ("C_GetMechanismList",
     "CK_SLOT_ID slotID, CK_MECHANISM_TYPE *pMechanismList, CK_ULONG *pulCount"),
    ("C_GetMechanismInfo",
     "CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO *pInfo"),
    ("C_InitToken", "CK_SLOT_ID slotID, char *pPin, CK_ULONG ulPinLen, char *pLabel"),
    ("C_InitPIN", f"{_S}, char *pPin, CK_ULONG ulPinLen"),
    ("C_SetPIN", f"{_S}, char *pOldPin, CK_ULONG ulOldLen, char *pNewPin, CK_ULONG ulNewLen"),
    ("C_OpenSession", "CK_SLOT_ID slotID, CK_FLAGS flags, void *pApplication, "
                      "CK_NOTIFY Notify, CK_SESSION_HANDLE *phSession"),
    ("C_CloseSession", _S),
    ("C_CloseAllSessions", "CK_SLOT_ID slotID"),
    ("C_GetSessionInfo", f"{_S}, CK_SESSION_INFO *pInfo"),
    ("C_GetOperationState", _FINAL_OUT),
    ("C_SetOperationState", f"{_S}, char *pOperationState, CK_ULONG ulOperationStateLen, "
                            "CK_OBJECT_HANDLE hEncryptionKey, CK_OBJECT_HANDLE hAuthenticationKey"),
    ("C_Login", f"{_S}, CK_USER_TYPE userType, char *pPin, CK_ULONG ulPinLen"),
    ("C_Logout", _S),
    ("C_CreateObject",
     f"{_S}, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE *phObject"),
    ("C_CopyObject", f"{_S}, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE *pTemplate, "
                     "CK_ULONG ulCount, CK_OBJECT_HANDLE *phNewObject"),
    ("C_DestroyObject", f"{_S}, CK_OBJECT_HANDLE hObject"),
    ("C_GetObjectSize", f"{_S}, CK_OBJECT_HANDLE hObject, CK_ULONG *pulSize"),
    ("C_GetAttributeValue",
     f"{_S}, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount"),
    ("C_SetAttributeValue",
     f"{_S}, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount"),
    ("C_FindObjectsInit", f"{_S}, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount"),
    ("C_FindObjects", f"{_S}, CK_OBJECT_HANDLE *phObject, CK_ULONG ulMaxObjectCount, "
                      "CK_ULONG *pulObjectCount"),
    ("C_FindObjectsFinal", _S),
    ("C_EncryptInit", _MECH_KEY),
    ("C_Encrypt", _DATA_OUT),
    ("C_EncryptUpdate", _DATA_OUT),
    ("C_EncryptFinal", _FINAL_OUT),
    ("C_DecryptInit", _MECH_KEY),
    ("C_Decrypt", _DATA_OUT),
    ("C_DecryptUpdate", _DATA_OUT),
    ("C_DecryptFinal", _FINAL_OUT),
    ("C_DigestInit", f"{_S}, CK_MECHANISM *pMechanism"),
    ("C_Digest", _DATA_OUT),
    ("C_DigestUpdate", _DATA_IN),
    ("C_DigestKey", f"{_S}, CK_OBJECT_HANDLE hKey"),
    ("C_DigestFinal", _FINAL_OUT),
    ("C_SignInit", _MECH_KEY),
    ("C_Sign", _DATA_OUT),
    ("C_SignUpdate", _DATA_IN),
    ("C_SignFinal", _FINAL_OUT),
    ("C_SignRecoverInit", _MECH_KEY),
    ("C_SignRecover", _DATA_OUT),
    ("C_VerifyInit", _MECH_KEY),
    ("C_Verify", f"{_S}, char *pData, CK_ULONG ulDataLen, char *pSignature, "
                 "CK_ULONG ulSignatureLen"),
    ("C_VerifyUpdate", _DATA_IN),
    ("C_VerifyFinal", f"{_S}, char *pSignature, CK_ULONG ulSignatureLen"),
    ("C_VerifyRecoverInit", _MECH_KEY),
    ("C_VerifyRecover", _DATA_OUT),
    ("C_DigestEncryptUpdate", _DATA_OUT),
    ("C_DecryptDigestUpdate", _DATA_OUT),
    ("C_SignEncryptUpdate", _DATA_OUT),
    ("C_DecryptVerifyUpdate", _DATA_OUT),
    ("C_GenerateKey", f"{_S}, CK_MECHANISM *pMechanism, CK_ATTRIBUTE *pTemplate, "
                      "CK_ULONG ulCount, CK_OBJECT_HANDLE *phKey"),
    ("C_GenerateKeyPair", f"{_S}, CK_MECHANISM *pMechanism, "
                          "CK_ATTRIBUTE *pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount, "
                          "CK_ATTRIBUTE *pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount, "
                          "CK_OBJECT_HANDLE *phPublicKey, CK_OBJECT_HANDLE *phPrivateKey"),
    ("C_WrapKey", f"{_S}, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hWrappingKey, "
                  "CK_OBJECT_HANDLE hKey, char *pWrappedKey, CK_ULONG *pulWrappedKeyLen"),
    ("C_UnwrapKey", f"{_S}, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hUnwrappingKey, "
                    "char *pWrappedKey, CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE *pTemplate, "
                    "CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE *phKey"),
    ("C_DeriveKey", f"{_S}, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hBaseKey, "
                    "CK_ATTRIBUTE *pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE *phKey"),
    ("C_SeedRandom", f"{_S}, char *pSeed, CK_ULONG ulSeedLen"),
    ("C_GenerateRandom", f"{_S}, char *pRandomData, CK_ULONG ulRandomLen"),
    ("C_GetFunctionStatus", _S),
    ("C_CancelFunction", _S),
    ("C_WaitForSlotEvent", "CK_FLAGS flags, CK_SLOT_ID *pSlot, void *pReserved"),
)

_MSG_ONE_SHOT = (f"{_S}, {_PARAM}, char *pAssociatedData, CK_ULONG ulAssociatedDataLen, "
                 "char *pIn, CK_ULONG ulInLen, char *pOut, CK_ULONG *pulOutLen")
_MSG_BEGIN = f"{_S}, {_PARAM}, char *pAssociatedData, CK_ULONG ulAssociatedDataLen"
_MSG_NEXT = (f"{_S}, {_PARAM}, char *pIn, CK_ULONG ulInLen, char *pOut, CK_ULONG *pulOutLen, "
             "CK_FLAGS flags")
_SIG_ONE_SHOT = (f"{_S}, {_PARAM}, char *pData, CK_ULONG ulDataLen, char *pSignature, "
                 "CK_ULONG *pulSignatureLen")
_VER_ONE_SHOT = (f"{_S}, {_PARAM}, char *pData, CK_ULONG ulDataLen, char *pSignature, "
                 "CK_ULONG ulSignatureLen")

SIGNATURES_30: Final[tuple[tuple[str, str], ...]] = (
    ("C_GetInterfaceList", "CK_INTERFACE *pInterfacesList, CK_ULONG *pulCount"),
    ("C_GetInterface", "char *pInterfaceName, CK_VERSION *pVersion, "
                       "CK_INTERFACE **ppInterface, CK_FLAGS flags"),
    ("C_LoginUser", f"{_S}, CK_USER_TYPE userType, char *pPin, CK_ULONG ulPinLen, "
                    "char *pUsername, CK_ULONG ulUsernameLen"),
    ("C_SessionCancel", f"{_S}, CK_FLAGS flags"),
    ("C_MessageEncryptInit", _MECH_KEY),
    ("C_EncryptMessage", _MSG_ONE_SHOT),
    ("C_EncryptMessageBegin", _MSG_BEGIN),
    ("C_EncryptMessageNext", _MSG_NEXT),
    ("C_MessageEncryptFinal", _S),
    ("C_MessageDecryptInit", _MECH_KEY),
    ("C_DecryptMessage", _MSG_ONE_SHOT),
    ("C_DecryptMessageBegin", _MSG_BEGIN),
    ("C_DecryptMessageNext", _MSG_NEXT),
    ("C_MessageDecryptFinal", _S),
    ("C_MessageSignInit", _MECH_KEY),
    ("C_SignMessage", _SIG_ONE_SHOT),
    ("C_SignMessageBegin", f"{_S}, {_PARAM}"),
    ("C_SignMessageNext", _SIG_ONE_SHOT),
    ("C_MessageSignFinal", _S),
    ("C_MessageVerifyInit", _MECH_KEY),
    ("C_VerifyMessage", _VER_ONE_SHOT),
    ("C_VerifyMessageBegin", f"{_S}, {_PARAM}"),
    ("C_VerifyMessageNext", _VER_ONE_SHOT),
    ("C_MessageVerifyFinal", _S),
)


def _struct(name: str, signatures: tuple[tuple[str, str], ...]) -> str:
    members = "".join(f"    CK_RV (*{fn})({params});\n" for fn, params in signatures)
    return f"typedef struct {name} {{\n    CK_VERSION version;\n{members}}} {name};\n"


CDEF: Final[str] = (
    TYPES
    + _struct("CK_FUNCTION_LIST", SIGNATURES_240)
    + _struct("CK_FUNCTION_LIST_3_0", SIGNATURES_240 + SIGNATURES_30)
    # The two exported entry points the loader looks up by name.
    + "CK_RV C_GetFunctionList(CK_FUNCTION_LIST **ppFunctionList);\n"
    + "CK_RV C_GetInterface(char *pInterfaceName, CK_VERSION *pVersion, "
      "CK_INTERFACE **ppInterface, CK_FLAGS flags);\n"
)
