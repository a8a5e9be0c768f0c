"""Typed mechanism parameters (protocol v4) -> native C structures, with cffi.

Every tag of :mod:`p11guard.wire.mechanisms` with a C structure has a line in
:data:`_TARGETS` saying where each wire field goes, in wire order:

* ``name``          a CK_ULONG / CK_BBOOL member;
* ``ptr/len``       an opaque -> a pointer member and its length member
                    (an empty opaque -> NULL and 0, as C callers pass "none");
* ``ptr/``          an opaque -> a pointer member only (a fixed-size buffer);
* ``ptr/*len``      a pointer and a *pointer to* its length (CK_PKCS5_PBKD2_PARAMS);
* ``name[]``        a fixed-size CK_BYTE array member.

Buffers are copies the module may write into: per-message parameters (IV
generation, the GCM tag, the CCM MAC) are read back after the call and sent to
the client (:meth:`BuiltParam.read_back`).
"""

from __future__ import annotations

from typing import Any, Final

from p11guard.pkcs11.binding import NULL, ffi
from p11guard.pkcs11.mechparams import ParamRefused
from p11guard.pkcs11.types import NativeValue
from p11guard.wire.mechanisms import PARAMS, TAGS, ParamValue

_TARGETS: Final[dict[str, str]] = {
    "RSA_PKCS_PSS": "hashAlg mgf sLen",
    "RSA_PKCS_OAEP": "hashAlg mgf source pSourceData/ulSourceDataLen",
    "GCM": "pIv/ulIvLen ulIvBits pAAD/ulAADLen ulTagBits",
    "CCM": "ulDataLen pNonce/ulNonceLen pAAD/ulAADLen ulMACLen",
    "AES_CTR": "ulCounterBits cb[]",
    "ECDH1_DERIVE": "kdf pSharedData/ulSharedDataLen pPublicData/ulPublicDataLen",
    "KEY_DERIVATION_STRING": "pData/ulLen",
    "AES_CBC_ENCRYPT_DATA": "iv[] pData/length",
    "DES_CBC_ENCRYPT_DATA": "iv[] pData/length",
    "PKCS5_PBKD2": "saltSource pSaltSourceData/ulSaltSourceDataLen iterations prf "
                   "pPrfData/ulPrfDataLen pPassword/*ulPasswordLen",
    "PKCS5_PBKD2_2": "saltSource pSaltSourceData/ulSaltSourceDataLen iterations prf "
                     "pPrfData/ulPrfDataLen pPassword/ulPasswordLen",
    "HKDF": "bExtract bExpand prfHashMechanism ulSaltType pSalt/ulSaltLen hSaltKey "
            "pInfo/ulInfoLen",
    "EDDSA": "phFlag pContextData/ulContextDataLen",
    "ECDH_AES_KEY_WRAP": "ulAESKeyBits kdf pSharedData/ulSharedDataLen",
    "X9_42_DH1_DERIVE": "kdf pOtherInfo/ulOtherInfoLen pPublicData/ulPublicDataLen",
    "CHACHA20_POLY1305": "pNonce/ulNonceLen pAAD/ulAADLen",
    "CHACHA20": "pBlockCounter/ blockCounterBits pNonce/ ulNonceBits",
    "GCM_MESSAGE": "pIv/ulIvLen ulIvFixedBits ivGenerator pTag/ ulTagBits",
    "CCM_MESSAGE": "ulDataLen pNonce/ulNonceLen ulNonceFixedBits nonceGenerator pMAC/ulMACLen",
    "CHACHA20_POLY1305_MESSAGE": "pNonce/ulNonceLen pTag/",
}

# (buffer field, bit-count field): the module reads or writes ``bits / 8`` bytes
# of the buffer, so a buffer shorter than that would let it run past our copy.
_BIT_BOUNDS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "GCM": (("iv", "iv_bits"),),
    "CHACHA20": (("block_counter", "block_counter_bits"), ("nonce", "nonce_bits")),
    "GCM_MESSAGE": (("tag", "tag_bits"), ("iv", "iv_fixed_bits")),
    "CCM_MESSAGE": (("nonce", "nonce_fixed_bits"),),
}


class BuiltParam:
    """A parameter in native memory and how to read its buffers back."""

    __slots__ = ("_readers", "native", "tag")

    def __init__(self, tag: int, native: NativeValue | bytes | None,
                 readers: list[Any]) -> None:
        self.tag = tag
        self.native = native
        self._readers = readers

    def read_back(self) -> ParamValue:
        """The parameter's current values (after the module may have written them)."""
        return self.tag, tuple(read() for read in self._readers)


def _const(value: Any) -> Any:
    return lambda: value


def _buffer(data: bytes) -> Any:
    """A writable copy of ``data`` (NULL when empty)."""
    if not data:
        return NULL
    return ffi.new("CK_BYTE[]", data)


def _reader(buf: Any, size: int) -> Any:
    if buf == NULL:
        return _const(b"")
    return lambda: ffi.buffer(buf, size)[:]


def _fill(struct: Any, targets: str, values: tuple[Any, ...], keep: list[Any]) -> list[Any]:
    """Assign ``values`` into ``struct`` as ``targets`` says; return the read-back functions."""
    readers: list[Any] = []
    for target, value in zip(targets.split(), values, strict=True):
        if target.endswith("[]"):
            name = target[:-2]
            data = bytes(value)
            ffi.memmove(getattr(struct, name), data, len(data))
            readers.append(_const(data))
        elif "/" in target:
            ptr_name, len_name = target.split("/")
            data = bytes(value)
            buf = _buffer(data)
            keep.append(buf)
            setattr(struct, ptr_name, buf)
            if len_name.startswith("*"):
                plen = ffi.new("CK_ULONG *", len(data))
                keep.append(plen)
                setattr(struct, len_name[1:], plen)
            elif len_name:
                setattr(struct, len_name, len(data))
            readers.append(_reader(buf, len(data)))
        else:
            setattr(struct, target, int(value))
            readers.append(_const(int(value)))
    return readers


def build(value: ParamValue) -> BuiltParam:
    """Native memory for a typed parameter; raises ParamRefused if it cannot be built."""
    tag, values = value
    shape = PARAMS.get(tag)
    if shape is None or len(values) != len(shape.fields):
        raise ParamRefused("malformed typed parameter")
    named = dict(zip(shape.field_names, values, strict=True))
    for buf_field, bits_field in _BIT_BOUNDS.get(shape.name, ()):
        if int(named[bits_field]) > 8 * len(named[buf_field]):
            raise ParamRefused(f"{shape.name}.{buf_field} shorter than {bits_field}")
    try:
        return _build(tag, shape.name, shape.c_struct, values)
    except (OverflowError, TypeError, ValueError) as exc:  # a value C cannot hold
        raise ParamRefused(f"{shape.name}: {type(exc).__name__}") from None


def _build(tag: int, name: str, c_struct: str, values: tuple[Any, ...]) -> BuiltParam:
    if name == "NONE":
        return BuiltParam(tag, None, [])
    if name in ("BYTES", "RAW"):
        data = bytes(values[0])
        return BuiltParam(tag, data or None, [_const(data)])
    if name == "ULONG":
        cell = ffi.new("CK_ULONG *", int(values[0]))
        return BuiltParam(tag, NativeValue(cell, ffi.sizeof("CK_ULONG"), cell),
                          [_const(int(values[0]))])
    keep: list[Any] = []
    struct = ffi.new(f"{c_struct} *")
    keep.append(struct)
    if name == "RSA_AES_KEY_WRAP":
        oaep = ffi.new("CK_RSA_PKCS_OAEP_PARAMS *")
        keep.append(oaep)
        struct.ulAESKeyBits = int(values[0])
        struct.pOAEPParams = oaep
        readers = [_const(int(values[0]))]
        readers += _fill(oaep, _TARGETS["RSA_PKCS_OAEP"], values[1:], keep)
    else:
        readers = _fill(struct, _TARGETS[name], values, keep)
    return BuiltParam(tag, NativeValue(struct, ffi.sizeof(c_struct), keep), readers)


assert set(_TARGETS) | {"NONE", "BYTES", "RAW", "ULONG", "RSA_AES_KEY_WRAP"} == set(TAGS)
