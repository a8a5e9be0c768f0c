"""C declarations of the mechanism parameter structures protocol v4 rebuilds.

Written from the PKCS#11 3.0 type definitions (Unix ABI: natural alignment,
CK_ULONG = unsigned long).  Added to the binding's FFI so the structures can
be handed to the module through ``CK_MECHANISM.pParameter``.
"""

from __future__ import annotations

from typing import Final

PARAMS_CDEF: Final[str] = """
typedef struct CK_RSA_PKCS_PSS_PARAMS {
    CK_ULONG hashAlg; CK_ULONG mgf; CK_ULONG sLen;
} CK_RSA_PKCS_PSS_PARAMS;

typedef struct CK_RSA_PKCS_OAEP_PARAMS {
    CK_ULONG hashAlg; CK_ULONG mgf; CK_ULONG source;
    void *pSourceData; CK_ULONG ulSourceDataLen;
} CK_RSA_PKCS_OAEP_PARAMS;

typedef struct CK_GCM_PARAMS {
    CK_BYTE *pIv; CK_ULONG ulIvLen; CK_ULONG ulIvBits;
    CK_BYTE *pAAD; CK_ULONG ulAADLen; CK_ULONG ulTagBits;
} CK_GCM_PARAMS;

typedef struct CK_CCM_PARAMS {
    CK_ULONG ulDataLen; CK_BYTE *pNonce; CK_ULONG ulNonceLen;
    CK_BYTE *pAAD; CK_ULONG ulAADLen; CK_ULONG ulMACLen;
} CK_CCM_PARAMS;

typedef struct CK_AES_CTR_PARAMS {
    CK_ULONG ulCounterBits; CK_BYTE cb[16];
} CK_AES_CTR_PARAMS;

typedef struct CK_ECDH1_DERIVE_PARAMS {
    CK_ULONG kdf; CK_ULONG ulSharedDataLen; CK_BYTE *pSharedData;
    CK_ULONG ulPublicDataLen; CK_BYTE *pPublicData;
} CK_ECDH1_DERIVE_PARAMS;

typedef struct CK_KEY_DERIVATION_STRING_DATA {
    CK_BYTE *pData; CK_ULONG ulLen;
} CK_KEY_DERIVATION_STRING_DATA;

typedef struct CK_AES_CBC_ENCRYPT_DATA_PARAMS {
    CK_BYTE iv[16]; CK_BYTE *pData; CK_ULONG length;
} CK_AES_CBC_ENCRYPT_DATA_PARAMS;

typedef struct CK_DES_CBC_ENCRYPT_DATA_PARAMS {
    CK_BYTE iv[8]; CK_BYTE *pData; CK_ULONG length;
} CK_DES_CBC_ENCRYPT_DATA_PARAMS;

typedef struct CK_PKCS5_PBKD2_PARAMS {
    CK_ULONG saltSource; void *pSaltSourceData; CK_ULONG ulSaltSourceDataLen;
    CK_ULONG iterations; CK_ULONG prf; void *pPrfData; CK_ULONG ulPrfDataLen;
    CK_BYTE *pPassword; CK_ULONG *ulPasswordLen;
} CK_PKCS5_PBKD2_PARAMS;

typedef struct CK_PKCS5_PBKD2_PARAMS2 {
    CK_ULONG saltSource; void *pSaltSourceData; CK_ULONG ulSaltSourceDataLen;
    CK_ULONG iterations; CK_ULONG prf; void *pPrfData; CK_ULONG ulPrfDataLen;
    CK_BYTE *pPassword; CK_ULONG ulPasswordLen;
} CK_PKCS5_PBKD2_PARAMS2;

typedef struct CK_HKDF_PARAMS {
    CK_BBOOL bExtract; CK_BBOOL bExpand; CK_ULONG prfHashMechanism; CK_ULONG ulSaltType;
    CK_BYTE *pSalt; CK_ULONG ulSaltLen; CK_ULONG hSaltKey;
    CK_BYTE *pInfo; CK_ULONG ulInfoLen;
} CK_HKDF_PARAMS;

typedef struct CK_EDDSA_PARAMS {
    CK_BBOOL phFlag; CK_ULONG ulContextDataLen; CK_BYTE *pContextData;
} CK_EDDSA_PARAMS;

typedef struct CK_ECDH_AES_KEY_WRAP_PARAMS {
    CK_ULONG ulAESKeyBits; CK_ULONG kdf; CK_ULONG ulSharedDataLen; CK_BYTE *pSharedData;
} CK_ECDH_AES_KEY_WRAP_PARAMS;

typedef struct CK_RSA_AES_KEY_WRAP_PARAMS {
    CK_ULONG ulAESKeyBits; CK_RSA_PKCS_OAEP_PARAMS *pOAEPParams;
} CK_RSA_AES_KEY_WRAP_PARAMS;

typedef struct CK_X9_42_DH1_DERIVE_PARAMS {
    CK_ULONG kdf; CK_ULONG ulOtherInfoLen; CK_BYTE *pOtherInfo;
    CK_ULONG ulPublicDataLen; CK_BYTE *pPublicData;
} CK_X9_42_DH1_DERIVE_PARAMS;

typedef struct CK_SALSA20_CHACHA20_POLY1305_PARAMS {
    CK_BYTE *pNonce; CK_ULONG ulNonceLen; CK_BYTE *pAAD; CK_ULONG ulAADLen;
} CK_SALSA20_CHACHA20_POLY1305_PARAMS;

typedef struct CK_CHACHA20_PARAMS {
    CK_BYTE *pBlockCounter; CK_ULONG blockCounterBits; CK_BYTE *pNonce; CK_ULONG ulNonceBits;
} CK_CHACHA20_PARAMS;

typedef struct CK_GCM_MESSAGE_PARAMS {
    CK_BYTE *pIv; CK_ULONG ulIvLen; CK_ULONG ulIvFixedBits; CK_ULONG ivGenerator;
    CK_BYTE *pTag; CK_ULONG ulTagBits;
} CK_GCM_MESSAGE_PARAMS;

typedef struct CK_CCM_MESSAGE_PARAMS {
    CK_ULONG ulDataLen; CK_BYTE *pNonce; CK_ULONG ulNonceLen; CK_ULONG ulNonceFixedBits;
    CK_ULONG nonceGenerator; CK_BYTE *pMAC; CK_ULONG ulMACLen;
} CK_CCM_MESSAGE_PARAMS;

typedef struct CK_SALSA20_CHACHA20_POLY1305_MSG_PARAMS {
    CK_BYTE *pNonce; CK_ULONG ulNonceLen; CK_BYTE *pTag;
} CK_SALSA20_CHACHA20_POLY1305_MSG_PARAMS;
"""
