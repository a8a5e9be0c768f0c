"""The binding's PKCS#11 3.0 path (C_GetInterface), exercised with a tiny C module.

No PKCS#11 3.0 module is installed here (SoftHSM2 2.6 exports only
C_GetFunctionList), so this test compiles a minimal one against the OASIS 3.0
definitions in NSS's header.  It is a loader test, not an acceptance test:
the module implements a handful of functions and leaves the rest NULL, which
is itself a case the binding must handle.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11.binding import Module

NSS = Path("/usr/include/nss/pkcs11.h")

SOURCE = r"""
#include <string.h>
#include <pkcs11.h>

static int initialized;

static CK_RV initialize(CK_VOID_PTR args) {
    (void)args;
    if (initialized) return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    initialized = 1;
    return CKR_OK;
}

static CK_RV finalize(CK_VOID_PTR reserved) {
    (void)reserved;
    if (!initialized) return CKR_CRYPTOKI_NOT_INITIALIZED;
    initialized = 0;
    return CKR_OK;
}

static CK_RV get_info(CK_INFO_PTR info) {
    if (!info) return CKR_ARGUMENTS_BAD;
    memset(info, ' ', sizeof *info);
    info->cryptokiVersion.major = 3;
    info->cryptokiVersion.minor = 0;
    info->flags = 0;
    info->libraryVersion.major = 0;
    info->libraryVersion.minor = 1;
    memcpy(info->manufacturerID, "p11guard test", 13);
    return CKR_OK;
}

static CK_RV login_user(CK_SESSION_HANDLE h, CK_USER_TYPE type, CK_UTF8CHAR_PTR pin,
                        CK_ULONG pin_len, CK_UTF8CHAR_PTR user, CK_ULONG user_len) {
    if (h != 7 || type != CKU_USER) return CKR_ARGUMENTS_BAD;
    if (!user || user_len != 5 || memcmp(user, "alice", 5)) return CKR_USER_TYPE_INVALID;
    if (!pin) return CKR_OK;  /* protected authentication path */
    if (pin_len != 4 || memcmp(pin, "1234", 4)) return CKR_PIN_INCORRECT;
    return CKR_OK;
}

static CK_RV session_cancel(CK_SESSION_HANDLE h, CK_FLAGS flags) {
    return (h == 7 && flags == CKF_SIGN) ? CKR_OK : CKR_OPERATION_CANCEL_FAILED;
}

static CK_FUNCTION_LIST_3_0 list30 = {
    .version = {3, 0},
    .C_Initialize = initialize,
    .C_Finalize = finalize,
    .C_GetInfo = get_info,
    .C_LoginUser = login_user,
    .C_SessionCancel = session_cancel,
};

static CK_FUNCTION_LIST list240 = {
    .version = {2, 40},
    .C_Initialize = initialize,
    .C_Finalize = finalize,
    .C_GetInfo = get_info,
};

static CK_INTERFACE iface = { (CK_CHAR *)"PKCS 11", &list30, 0 };

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
    if (!out) return CKR_ARGUMENTS_BAD;
    *out = &list240;
    return CKR_OK;
}

CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                     CK_INTERFACE_PTR_PTR out, CK_FLAGS flags) {
    (void)flags;
    if (!out) return CKR_ARGUMENTS_BAD;
    if (name && strcmp((const char *)name, "PKCS 11")) return CKR_ARGUMENTS_BAD;
    if (version && version->major != 3) return CKR_ARGUMENTS_BAD;
    *out = &iface;
    return CKR_OK;
}
"""


@pytest.fixture(scope="module")
def module30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not NSS.exists():
        pytest.skip("needs a C compiler and NSS's PKCS#11 3.0 header")
    root = tmp_path_factory.mktemp("mod30")
    src = root / "mod30.c"
    lib = root / "libmod30.so"
    src.write_text(SOURCE)
    subprocess.run(
        [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
         f"-I{NSS.parent}", "-I/usr/include/nspr", str(src), "-o", str(lib)],
        check=True, capture_output=True,
    )
    return lib


def test_interface_30_is_preferred(module30: Path) -> None:
    m = Module(str(module30))
    assert m.version == (3, 0) and m.interface_30
    assert m.has("C_LoginUser") and m.has("C_SessionCancel")
    assert not m.has("C_Sign") and not m.has("C_EncryptMessage")  # NULL entries
    assert m.raw_function("C_Sign") is None and m.raw_function("C_LoginUser") is not None
    assert m.initialize() == c.CKR_OK
    rv, info = m.get_info()
    assert rv == c.CKR_OK and info is not None and info.cryptoki_version == (3, 0)
    assert info.manufacturer_id == b"p11guard test".ljust(32)

    assert m.login_user(7, c.CKU_USER, b"1234", b"alice") == c.CKR_OK
    assert m.login_user(7, c.CKU_USER, b"0000", b"alice") == c.CKR_PIN_INCORRECT
    assert m.login_user(7, c.CKU_USER, None, b"alice") == c.CKR_OK
    assert m.login_user(7, c.CKU_USER, b"1234", None) == c.CKR_USER_TYPE_INVALID
    assert m.session_cancel(7, c.CKF_SIGN) == c.CKR_OK
    assert m.session_cancel(7, c.CKF_ENCRYPT) == c.CKR_OPERATION_CANCEL_FAILED

    # Functions the module left NULL answer CKR_FUNCTION_NOT_SUPPORTED, never crash.
    assert m.sign(7, b"data", 16) == (c.CKR_FUNCTION_NOT_SUPPORTED, None, 16)  # *pulLen untouched
    assert m.get_slot_list(True, None) == (c.CKR_FUNCTION_NOT_SUPPORTED, [], 0)
    assert m.get_attribute_value(7, 1, [(c.CKA_VALUE, 4)])[0] == c.CKR_FUNCTION_NOT_SUPPORTED
    assert m.finalize() == c.CKR_OK
    m.close()
    assert m.login_user(7, c.CKU_USER, b"1234", b"alice") == c.CKR_CRYPTOKI_NOT_INITIALIZED
