"""The cffi declarations have the same ABI as the system's C headers.

Our ``cdef`` is written by hand; a C compiler is the independent judge of
sizes and offsets.  p11-kit's header (in standard-name mode) checks the 2.40
structures, NSS's header (which carries the OASIS 3.0 definitions) the 3.0
ones.  Skipped when no C compiler or header is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from p11guard.pkcs11._cdef import SIGNATURES_30, SIGNATURES_240
from p11guard.pkcs11.binding import ffi

P11KIT = Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h")
NSS = Path("/usr/include/nss/pkcs11.h")

STRUCTS_240 = (
    "CK_VERSION", "CK_INFO", "CK_SLOT_INFO", "CK_TOKEN_INFO", "CK_SESSION_INFO",
    "CK_ATTRIBUTE", "CK_MECHANISM", "CK_MECHANISM_INFO", "CK_C_INITIALIZE_ARGS",
    "CK_FUNCTION_LIST",
)
# NSS's CK_C_INITIALIZE_ARGS has an extra non-standard field; everything else is standard.
STRUCTS_30 = (
    *(s for s in STRUCTS_240 if s != "CK_C_INITIALIZE_ARGS"),
    "CK_INTERFACE", "CK_FUNCTION_LIST_3_0",
)


def _fields(struct: str) -> list[str]:
    return [name for name, _field in ffi.typeof(struct).fields]


def _program(prelude: str, structs: tuple[str, ...]) -> str:
    lines = [prelude, "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
    for struct in structs:
        lines.append(f'  printf("{struct} %zu\\n", sizeof({struct}));')
        for field in _fields(struct):
            lines.append(
                f'  printf("{struct}.{field} %zu\\n", offsetof({struct}, {field}));'
            )
    lines += ["  return 0;", "}"]
    return "\n".join(lines)


def _ours(structs: tuple[str, ...]) -> dict[str, int]:
    result = {}
    for struct in structs:
        result[struct] = ffi.sizeof(struct)
        for field in _fields(struct):
            result[f"{struct}.{field}"] = ffi.offsetof(struct, field)
    return result


def _theirs(tmp_path: Path, source: str, flags: list[str]) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "layout.c"
    exe = tmp_path / "layout"
    src.write_text(source)
    subprocess.run([cc, *flags, str(src), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(not P11KIT.exists(), reason="p11-kit header not installed")
def test_240_layout_matches_p11kit_header(tmp_path: Path) -> None:
    prelude = "#define CRYPTOKI_COMPAT 1\n#include <p11-kit/pkcs11.h>"
    theirs = _theirs(tmp_path, _program(prelude, STRUCTS_240), [f"-I{P11KIT.parent.parent}"])
    assert _ours(STRUCTS_240) == theirs


@pytest.mark.skipif(not NSS.exists(), reason="NSS headers not installed")
def test_30_layout_matches_oasis_header(tmp_path: Path) -> None:
    prelude = "#include <pkcs11.h>"
    flags = [f"-I{NSS.parent}", "-I/usr/include/nspr"]
    theirs = _theirs(tmp_path, _program(prelude, STRUCTS_30), flags)
    assert _ours(STRUCTS_30) == theirs


def test_function_list_order_is_the_standard_one() -> None:
    names = [name for name, _ in SIGNATURES_240]
    assert names[0] == "C_Initialize" and names[3] == "C_GetFunctionList"
    assert names[-1] == "C_WaitForSlotEvent" and len(names) == 68
    assert len(SIGNATURES_30) == 24
    assert ffi.sizeof("CK_FUNCTION_LIST") == ffi.sizeof("void *") * 69  # version + 68
