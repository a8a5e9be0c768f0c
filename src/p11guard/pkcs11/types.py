"""Plain Python shapes of the PKCS#11 structures the binding returns.

Text fields stay raw bytes at the full fixed width the module returned
(blank-padded, not NUL-terminated): the proxy forwards them byte for byte, and
only a presentation layer should strip or decode them.
"""

from __future__ import annotations

from dataclasses import dataclass

Version = tuple[int, int]  # (major, minor)
# (mechanism type, parameter); None and b"" both reach the module as NULL/0.
# Protocol v4 passes a structure built in native memory as a NativeValue.
Mechanism = tuple[int, "bytes | NativeValue | None"]
# Input templates: (attribute type, raw value bytes in the module's layout, or a
# nested CK_ATTRIBUTE array built in native memory).
Template = list[tuple[int, "bytes | NativeValue"]]


@dataclass(frozen=True, slots=True)
class Info:
    cryptoki_version: Version
    manufacturer_id: bytes  # 32
    flags: int
    library_description: bytes  # 32
    library_version: Version


@dataclass(frozen=True, slots=True)
class SlotInfo:
    slot_description: bytes  # 64
    manufacturer_id: bytes  # 32
    flags: int
    hardware_version: Version
    firmware_version: Version


@dataclass(frozen=True, slots=True)
class TokenInfo:
    label: bytes  # 32
    manufacturer_id: bytes  # 32
    model: bytes  # 16
    serial_number: bytes  # 16
    flags: int
    max_session_count: int
    session_count: int
    max_rw_session_count: int
    rw_session_count: int
    max_pin_len: int
    min_pin_len: int
    total_public_memory: int
    free_public_memory: int
    total_private_memory: int
    free_private_memory: int
    hardware_version: Version
    firmware_version: Version
    utc_time: bytes  # 16


@dataclass(frozen=True, slots=True)
class SessionInfo:
    slot_id: int
    state: int
    flags: int
    device_error: int


@dataclass(frozen=True, slots=True)
class MechanismInfo:
    min_key_size: int
    max_key_size: int
    flags: int


class NativeValue:
    """A value already laid out in native memory: a C parameter structure or a
    nested CK_ATTRIBUTE array (protocol v4).  The binding passes ``pointer`` and
    ``size`` to the module as they are; ``keep`` holds every buffer the
    structure points into, alive for as long as this object is."""

    __slots__ = ("keep", "pointer", "size")

    def __init__(self, pointer: object, size: int, keep: object = None) -> None:
        self.pointer = pointer
        self.size = size
        self.keep = keep

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return True  # never "empty": a structure is never passed as NULL

    def __repr__(self) -> str:
        return f"NativeValue(<{self.size} bytes>)"


class TemplateRequest:
    """A GetAttributeValue request entry for an array attribute (CKA_WRAP_TEMPLATE):
    the module gets a CK_ATTRIBUTE array of ``entries`` (type, buffer length or
    None for a NULL pValue) and the answer's value is the list of inner
    ``(type, value | None, ulValueLen)``."""

    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[int, int | None]]) -> None:
        self.entries = entries
