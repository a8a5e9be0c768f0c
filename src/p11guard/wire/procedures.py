"""THE procedure table of Caml Crush's protocol (ONC RPC program 4, version 3).

Every other piece of the project that needs to know the shape of a call reads it
from here: the Python codec (``codec.py``), the server dispatcher, the test client
and the generator of the C client's codec table (``tools/gen_c_procs.py``).
A procedure is added in this one table, never in five places.

Argument and result fields are listed in wire order.  Argument kinds follow the
XDR definitions of Caml Crush 1.0.12 (``pkcs11_rpc.x``); every result starts with
``rv``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PROGRAM = 4
VERSION_CAMLCRUSH = 3
VERSION_P11GUARD = 4


class Kind(enum.Enum):
    """The XDR shapes that occur in the protocol."""

    HYPER = "H"  # pkcs11_int: signed 64-bit on the wire, CK_ULONG semantics
    OPAQUE = "O"  # opaque_data: opaque<>
    MECHANISM = "M"  # rpc_ck_mechanism: hyper type, opaque parameter
    TEMPLATE = "T"  # rpc_ck_attribute_array: <type hyper, value opaque, value_len hyper>
    HYPER_LIST = "L"  # hyper<>
    INFO = "info"  # rpc_ck_info
    SLOT_INFO = "slot_info"  # rpc_ck_slot_info
    TOKEN_INFO = "token_info"  # rpc_ck_token_info
    SESSION_INFO = "session_info"  # rpc_ck_session_info
    MECHANISM_INFO = "mechanism_info"  # rpc_ck_mechanism_info
    # Protocol version 4 only (p11guard's own, see docs/protocol.md):
    TYPED_MECHANISM = "TM"  # hyper type + typed parameter (wire/mechanisms.py)
    TYPED_PARAM = "TP"  # a typed parameter alone (message-based functions)
    TYPED_TEMPLATE = "TT"  # typed, nestable attribute array (wire/templates.py)


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class Procedure:
    number: int
    name: str  # the PKCS#11 name without the "C_" prefix, e.g. "SignInit"
    args: tuple[Field, ...]
    result: tuple[Field, ...]  # always starts with Field("rv", HYPER)

    @property
    def c_name(self) -> str:
        return "C_" + self.name


# Structures: fields in wire order.  ``("text", N)`` is an opaque of at most N
# bytes (N=0: unbounded in the .x file, bounded by the codec's limits);
# ``"version"`` is rpc_ck_version (two opaque<1>).
STRUCTS: dict[Kind, tuple[tuple[str, str | tuple[str, int]], ...]] = {
    Kind.INFO: (
        ("cryptoki_version", "version"),
        ("manufacturer_id", ("text", 32)),
        ("flags", "hyper"),
        ("library_description", ("text", 32)),
        ("library_version", "version"),
    ),
    Kind.SLOT_INFO: (
        ("slot_description", ("text", 0)),
        ("manufacturer_id", ("text", 0)),
        ("flags", "hyper"),
        ("hardware_version", "version"),
        ("firmware_version", "version"),
    ),
    Kind.TOKEN_INFO: (
        ("label", ("text", 32)),
        ("manufacturer_id", ("text", 32)),
        ("model", ("text", 16)),
        ("serial_number", ("text", 16)),
        ("flags", "hyper"),
        ("max_session_count", "hyper"),
        ("session_count", "hyper"),
        ("max_rw_session_count", "hyper"),
        ("rw_session_count", "hyper"),
        ("max_pin_len", "hyper"),
        ("min_pin_len", "hyper"),
        ("total_public_memory", "hyper"),
        ("free_public_memory", "hyper"),
        ("total_private_memory", "hyper"),
        ("free_private_memory", "hyper"),
        ("hardware_version", "version"),
        ("firmware_version", "version"),
        ("utc_time", ("text", 16)),
    ),
    Kind.SESSION_INFO: (
        ("slot_id", "hyper"),
        ("state", "hyper"),
        ("flags", "hyper"),
        ("device_error", "hyper"),
    ),
    Kind.MECHANISM_INFO: (
        ("min_key_size", "hyper"),
        ("max_key_size", "hyper"),
        ("flags", "hyper"),
    ),
}

def _f(spec: str) -> tuple[Field, ...]:
    """Parse ``"session:H data:O"`` into fields."""
    fields = []
    for item in spec.split():
        name, code = item.split(":")
        fields.append(Field(name, Kind(code)))
    return tuple(fields)


_RV = "rv:H"
_VALUE = "rv:H value:O"
_HANDLE = "rv:H handle:H"

# (number, name, arguments, result).  Rows with the same shape sit together so
# that the table reads like the protocol reference.
_TABLE: tuple[tuple[int, str, str, str], ...] = (
    (2, "SetupArch", "arch:H", _RV),
    (70, "LoadModule", "module_name:O", _RV),
    (3, "Initialize", "", _RV),
    (13, "Finalize", "", _RV),
    (5, "GetInfo", "", "rv:H info:info"),
    (4, "GetSlotList", "token_present:H count:H", "rv:H slot_list:L count:H"),
    (14, "GetMechanismList", "slot_id:H count:H", "rv:H mechanism_list:L count:H"),
    (6, "WaitForSlotEvent", "flags:H", "rv:H count:H"),
    (7, "GetSlotInfo", "slot_id:H", "rv:H slot_info:slot_info"),
    (8, "GetTokenInfo", "slot_id:H", "rv:H token_info:token_info"),
    (15, "CloseAllSessions", "slot_id:H", _RV),
    (17, "GetMechanismInfo", "slot_id:H mechanism_type:H", "rv:H mechanism_info:mechanism_info"),
    (21, "InitToken", "slot_id:H so_pin:O label:O", _RV),
    (11, "OpenSession", "slot_id:H flags:H", _HANDLE),
    (9, "Login", "session:H user_type:H pin:O", _RV),
    (10, "Logout", "session:H", _RV),
    (12, "CloseSession", "session:H", _RV),
    (25, "FindObjectsFinal", "session:H", _RV),
    (68, "GetFunctionStatus", "session:H", _RV),
    (69, "CancelFunction", "session:H", _RV),
    (16, "GetSessionInfo", "session:H", "rv:H session_info:session_info"),
    (18, "InitPIN", "session:H pin:O", _RV),
    (20, "SeedRandom", "session:H seed:O", _RV),
    (39, "DigestUpdate", "session:H data:O", _RV),
    (44, "SignUpdate", "session:H data:O", _RV),
    (48, "VerifyUpdate", "session:H data:O", _RV),
    (49, "VerifyFinal", "session:H signature:O", _RV),
    (19, "SetPIN", "session:H old_pin:O new_pin:O", _RV),
    (22, "GenerateRandom", "session:H length:H", "rv:H data:O"),
    (23, "FindObjectsInit", "session:H template:T", _RV),
    (24, "FindObjects", "session:H max_count:H", "rv:H objects:L count:H"),
    (26, "GenerateKey", "session:H mechanism:M template:T", _HANDLE),
    (
        27,
        "GenerateKeyPair",
        "session:H mechanism:M public_template:T private_template:T",
        "rv:H public_handle:H private_handle:H",
    ),
    (28, "CreateObject", "session:H template:T", _HANDLE),
    (29, "CopyObject", "session:H object:H template:T", _HANDLE),
    (30, "DestroyObject", "session:H object:H", _RV),
    (41, "DigestKey", "session:H key:H", _RV),
    (31, "GetAttributeValue", "session:H object:H template:T", "rv:H template:T"),
    (32, "SetAttributeValue", "session:H object:H template:T", _RV),
    (33, "GetObjectSize", "session:H object:H", "rv:H size:H"),
    (34, "WrapKey", "session:H mechanism:M wrapping_key:H key:H", _VALUE),
    (
        35,
        "UnwrapKey",
        "session:H mechanism:M unwrapping_key:H wrapped_key:O template:T",
        _HANDLE,
    ),
    (36, "DeriveKey", "session:H mechanism:M base_key:H template:T", _HANDLE),
    (37, "DigestInit", "session:H mechanism:M", _RV),
    (42, "SignInit", "session:H mechanism:M key:H", _RV),
    (46, "VerifyInit", "session:H mechanism:M key:H", _RV),
    (50, "EncryptInit", "session:H mechanism:M key:H", _RV),
    (54, "DecryptInit", "session:H mechanism:M key:H", _RV),
    (58, "SignRecoverInit", "session:H mechanism:M key:H", _RV),
    (60, "VerifyRecoverInit", "session:H mechanism:M key:H", _RV),
    (38, "Digest", "session:H data:O", _VALUE),
    (43, "Sign", "session:H data:O", _VALUE),
    (51, "Encrypt", "session:H data:O", _VALUE),
    (52, "EncryptUpdate", "session:H data:O", _VALUE),
    (55, "Decrypt", "session:H data:O", _VALUE),
    (56, "DecryptUpdate", "session:H data:O", _VALUE),
    (59, "SignRecover", "session:H data:O", _VALUE),
    (61, "VerifyRecover", "session:H data:O", _VALUE),
    (62, "DigestEncryptUpdate", "session:H data:O", _VALUE),
    (63, "SignEncryptUpdate", "session:H data:O", _VALUE),
    (64, "DecryptDigestUpdate", "session:H data:O", _VALUE),
    (65, "DecryptVerifyUpdate", "session:H data:O", _VALUE),
    (40, "DigestFinal", "session:H", _VALUE),
    (45, "SignFinal", "session:H", _VALUE),
    (53, "EncryptFinal", "session:H", _VALUE),
    (57, "DecryptFinal", "session:H", _VALUE),
    (66, "GetOperationState", "session:H", _VALUE),
    (47, "Verify", "session:H data:O signature:O", _RV),
    (
        67,
        "SetOperationState",
        "session:H state:O encryption_key:H authentication_key:H",
        _RV,
    ),
)

PROCEDURES: tuple[Procedure, ...] = tuple(
    Procedure(number, name, _f(args), _f(result)) for number, name, args, result in _TABLE
)
BY_NUMBER: dict[int, Procedure] = {p.number: p for p in PROCEDURES}
BY_NAME: dict[str, Procedure] = {p.name: p for p in PROCEDURES}

# Procedures that are protocol plumbing rather than PKCS#11 functions.
CONTROL_PROCEDURES = frozenset({"SetupArch", "LoadModule"})

# SetupArch codes (the client's CK_ULONG size and byte order).
ARCH_LITTLE_ENDIAN_64 = 1
ARCH_LITTLE_ENDIAN_32 = 2
ARCH_BIG_ENDIAN_64 = 3
ARCH_BIG_ENDIAN_32 = 4
ARCH_UNSUPPORTED = 5
ARCH_NOT_INITIALIZED = 6

assert len(PROCEDURES) == 69 and len(BY_NUMBER) == 69, "the protocol has 69 procedures"
assert sorted(BY_NUMBER) == list(range(2, 71))


# --- protocol version 4 (p11guard's own; docs/protocol.md) -----------------------
#
# The same table form.  Version 4 keeps every version-3 procedure number with the
# same meaning, with typed encodings where version 3 carried client memory:
# mechanisms (M -> TM), templates (T -> TT), GetAttributeValue (a list of types in,
# a typed template out), Initialize (the caller's CK_C_INITIALIZE_ARGS flags) and
# the output calls (the caller's buffer size in, ``length`` out: C's length
# queries and CKR_BUFFER_TOO_SMALL travel as they are, no client-side cache).
# New numbers (71 and up) carry the PKCS#11 3.0 functions.

OUT_LEN_NULL = (1 << 64) - 1  # out_len meaning "the output pointer is NULL"
_VALUE4 = "rv:H value:O length:H"
_OUTPUT_CALLS = frozenset(
    name for _, name, _, result in _TABLE if result == _VALUE
)

_V4_OVERRIDES: dict[str, tuple[str, str]] = {
    "Initialize": ("flags:H", _RV),
    "GetAttributeValue": ("session:H object:H types:L", "rv:H template:TT"),
}


def _v4_row(number: int, name: str, args: str, result: str) -> tuple[int, str, str, str]:
    if name in _V4_OVERRIDES:
        args, result = _V4_OVERRIDES[name]
        return number, name, args, result
    args = " ".join(
        item.replace(":M", ":TM") if item.endswith(":M") else
        item.replace(":T", ":TT") if item.endswith(":T") else item
        for item in args.split()
    )
    if name in _OUTPUT_CALLS:
        args = f"{args} out_len:H"
        result = _VALUE4
    return number, name, args, result


_MSG_IN = "session:H parameter:TP associated_data:O data:O out_len:H"
_MSG_NEXT = "session:H parameter:TP data:O out_len:H flags:H"
_MSG_OUT = "rv:H parameter:TP value:O length:H"

_TABLE_V4_NEW: tuple[tuple[int, str, str, str], ...] = (
    (71, "GetInterfaceInfo", "", "rv:H major:H minor:H flags:H functions:L"),
    (72, "LoginUser", "session:H user_type:H pin:O username:O", _RV),
    (73, "SessionCancel", "session:H flags:H", _RV),
    (74, "MessageEncryptInit", "session:H mechanism:TM key:H", _RV),
    (75, "EncryptMessage", _MSG_IN, _MSG_OUT),
    (76, "EncryptMessageBegin", "session:H parameter:TP associated_data:O",
     "rv:H parameter:TP"),
    (77, "EncryptMessageNext", _MSG_NEXT, _MSG_OUT),
    (78, "MessageEncryptFinal", "session:H", _RV),
    (79, "MessageDecryptInit", "session:H mechanism:TM key:H", _RV),
    (80, "DecryptMessage", _MSG_IN, _MSG_OUT),
    (81, "DecryptMessageBegin", "session:H parameter:TP associated_data:O",
     "rv:H parameter:TP"),
    (82, "DecryptMessageNext", _MSG_NEXT, _MSG_OUT),
    (83, "MessageDecryptFinal", "session:H", _RV),
    (84, "MessageSignInit", "session:H mechanism:TM key:H", _RV),
    (85, "SignMessage", "session:H parameter:TP data:O out_len:H", _VALUE4),
    (86, "SignMessageBegin", "session:H parameter:TP", _RV),
    (87, "SignMessageNext", "session:H parameter:TP data:O final:H out_len:H", _VALUE4),
    (88, "MessageSignFinal", "session:H", _RV),
    (89, "MessageVerifyInit", "session:H mechanism:TM key:H", _RV),
    (90, "VerifyMessage", "session:H parameter:TP data:O signature:O", _RV),
    (91, "VerifyMessageBegin", "session:H parameter:TP", _RV),
    (92, "VerifyMessageNext", "session:H parameter:TP data:O final:H signature:O", _RV),
    (93, "MessageVerifyFinal", "session:H", _RV),
    # Not PKCS#11 functions: a further connection to this worker for one client
    # thread (docs/protocol.md, server/channels.py).  Over a Unix socket the reply
    # carries the connection itself (SCM_RIGHTS, empty ticket); over TCP a ticket,
    # which the client presents in JoinChannel, the first call of a new connection.
    (94, "OpenChannel", "", "rv:H ticket:O"),
    (95, "JoinChannel", "ticket:O", _RV),
)

_TABLE_V4: tuple[tuple[int, str, str, str], ...] = (
    tuple(_v4_row(*row) for row in _TABLE) + _TABLE_V4_NEW
)

PROCEDURES_V4: tuple[Procedure, ...] = tuple(
    Procedure(number, name, _f(args), _f(result)) for number, name, args, result in _TABLE_V4
)

# Per protocol version: number -> procedure.  THE lookup the worker, the codec
# and the clients use.
TABLES: dict[int, dict[int, Procedure]] = {
    VERSION_CAMLCRUSH: BY_NUMBER,
    VERSION_P11GUARD: {p.number: p for p in PROCEDURES_V4},
}
BY_NAME_V4: dict[str, Procedure] = {p.name: p for p in PROCEDURES_V4}
NAMES_BY_VERSION: dict[int, dict[str, Procedure]] = {
    VERSION_CAMLCRUSH: BY_NAME,
    VERSION_P11GUARD: BY_NAME_V4,
}

assert sorted(TABLES[VERSION_P11GUARD]) == list(range(2, 96))
