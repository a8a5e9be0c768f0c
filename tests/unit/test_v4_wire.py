"""Protocol v4: the table, typed parameters and templates (codec), native structures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p11guard.config.tomlconf import toml_to_config
from p11guard.pkcs11 import constants as c
from p11guard.pkcs11 import cparams, paramtable
from p11guard.pkcs11.binding import ffi
from p11guard.pkcs11.mechparams import ParamRefused
from p11guard.wire import procedures as P
from p11guard.wire.codec import CODECS_BY_VERSION, PROCEDURE_CODECS, Limits
from p11guard.wire.mechanisms import PARAMS, TAGS, param
from p11guard.wire.templates import TypedTemplate, ValueKind
from p11guard.wire.xdr import XdrError

V4 = CODECS_BY_VERSION[4]
B, U, T, A, X = (ValueKind.BYTES, ValueKind.ULONG, ValueKind.TEMPLATE, ValueKind.ULONG_ARRAY,
                 ValueKind.UNAVAILABLE)


def test_v3_table_and_codecs_unchanged() -> None:
    assert CODECS_BY_VERSION[3] is PROCEDURE_CODECS
    assert len(P.PROCEDURES) == 69 and P.TABLES[3] is P.BY_NUMBER
    # Every v3 number keeps its meaning in v4.
    for number, proc in P.TABLES[3].items():
        assert P.TABLES[4][number].name == proc.name


def test_v4_typed_shapes() -> None:
    t = P.TABLES[4]
    assert [f.kind for f in P.BY_NAME_V4["EncryptInit"].args] == [
        P.Kind.HYPER, P.Kind.TYPED_MECHANISM, P.Kind.HYPER]
    assert P.BY_NAME_V4["Sign"].args[-1].name == "out_len"
    assert [f.name for f in P.BY_NAME_V4["Sign"].result] == ["rv", "value", "length"]
    assert t[3].args[0].name == "flags"  # Initialize(flags)
    assert t[31].result[1].kind is P.Kind.TYPED_TEMPLATE
    assert max(t) == 95 and not any(f.kind in (P.Kind.MECHANISM, P.Kind.TEMPLATE)
                                    for p in t.values() for f in p.args + p.result)


def test_golden_gcm_mechanism_bytes() -> None:
    gcm = param("GCM", iv=b"\x01" * 12, iv_bits=96, aad=b"ab", tag_bits=128)
    body = V4[50].args.encode((7, (c.CKM_AES_GCM, gcm), 9))
    assert body.hex() == (
        "0000000000000007" "0000000000001087" "00000005"
        "0000000c" + "01" * 12 + "0000000000000060" "00000002" "61620000"
        "0000000000000080" "0000000000000009")
    assert V4[50].args.decode(body) == (7, (c.CKM_AES_GCM, gcm), 9)


def test_golden_nested_template_bytes() -> None:
    tmpl = [(c.CKA_WRAP_TEMPLATE, T, [(c.CKA_CLASS, U, 4)]),
            (c.CKA_ALLOWED_MECHANISMS, A, [0x1087]), (c.CKA_LABEL, B, b"k")]
    body = V4[28].args.encode((1, tmpl))
    assert body.hex() == (
        "0000000000000001" "00000003"
        "0000000040000211" "00000002" "00000001" "0000000000000000" "00000001"
        "0000000000000004"
        "0000000040000600" "00000003" "00000001" "0000000000001087"
        "0000000000000003" "00000000" "00000001" "6b000000")
    assert V4[28].args.decode(body) == (1, tmpl)


def test_templates_nest_one_level_only_and_are_bounded() -> None:
    deep: TypedTemplate = [(c.CKA_WRAP_TEMPLATE, T, [(c.CKA_DERIVE_TEMPLATE, T, [])])]
    with pytest.raises(ValueError):
        V4[28].args.encode((1, deep))
    raw = bytes.fromhex("0000000000000001" "00000001" "0000000040000211" "00000002"
                        "00000001" "0000000040000213" "00000002" "00000000")
    with pytest.raises(XdrError):
        V4[28].args.decode(raw)
    huge = bytes.fromhex("0000000000000001" "00100000")
    with pytest.raises(XdrError):
        V4[28].args.decode(huge, Limits(max_attributes=16))
    bad_kind = bytes.fromhex("0000000000000001" "00000001" "0000000000000000" "00000009")
    with pytest.raises(XdrError):
        V4[28].args.decode(bad_kind)


def test_unknown_tag_and_wrong_fixed_size_are_garbage() -> None:
    with pytest.raises(XdrError):
        V4[50].args.decode(bytes.fromhex("00" * 8 + "0000000000001087" "000000ff" + "00" * 8))
    ctr = bytes.fromhex("0000000000000001" "0000000000001086" "00000007" "0000000000000080"
                        "00000004" "00000000" "0000000000000002")
    with pytest.raises(XdrError):
        V4[50].args.decode(ctr)


_hyper = st.integers(0, 2**64 - 1)


@st.composite
def _params(draw: st.DrawFn) -> tuple[int, tuple[object, ...]]:
    shape = PARAMS[draw(st.sampled_from(sorted(PARAMS)))]
    values: list[object] = []
    for _, code in shape.fields:
        if code == "h":
            values.append(draw(_hyper))
        elif code == "o":
            values.append(draw(st.binary(max_size=40)))
        else:
            values.append(draw(st.binary(min_size=int(code[1:]), max_size=int(code[1:]))))
    return shape.tag, tuple(values)


@given(_params(), _hyper)
def test_every_param_round_trips(value: tuple[int, tuple[object, ...]], mech: int) -> None:
    codec = V4[74].args  # MessageEncryptInit: session, typed mechanism, key
    assert codec.decode(codec.encode((1, (mech, value), 2))) == (1, (mech, value), 2)


def test_native_structures_have_the_c_layout() -> None:
    built = cparams.build(param("ECDH1_DERIVE", kdf=c.CKD_NULL, shared_data=b"",
                                public_data=b"\x04" + b"\x01" * 64))
    assert built.native is not None and len(built.native) == ffi.sizeof("CK_ECDH1_DERIVE_PARAMS")
    s = ffi.cast("CK_ECDH1_DERIVE_PARAMS *", built.native.pointer)  # type: ignore[union-attr]
    assert s.kdf == c.CKD_NULL and s.pSharedData == ffi.NULL and s.ulSharedDataLen == 0
    assert s.ulPublicDataLen == 65 and ffi.buffer(s.pPublicData, 65)[:1] == b"\x04"
    pbkdf = cparams.build(param("PKCS5_PBKD2", salt_source=1, salt_source_data=b"salt",
                                iterations=1000, prf=1, prf_data=b"", password=b"secret"))
    p = ffi.cast("CK_PKCS5_PBKD2_PARAMS *", pbkdf.native.pointer)  # type: ignore[union-attr]
    assert p.ulPasswordLen[0] == 6 and p.iterations == 1000
    ulong = cparams.build(param("ULONG", value=20))
    assert ffi.cast("CK_ULONG *", ulong.native.pointer)[0] == 20  # type: ignore[union-attr]
    assert cparams.build(param("NONE")).native is None


def test_message_buffers_are_read_back() -> None:
    built = cparams.build(param("GCM_MESSAGE", iv=b"\0" * 12, iv_fixed_bits=0,
                                iv_generator=3, tag=b"\0" * 16, tag_bits=128))
    s = ffi.cast("CK_GCM_MESSAGE_PARAMS *", built.native.pointer)  # type: ignore[union-attr]
    ffi.memmove(s.pTag, b"T" * 16, 16)  # what a module does
    assert built.read_back()[1][3] == b"T" * 16


def test_buffers_shorter_than_their_bit_counts_are_refused() -> None:
    with pytest.raises(ParamRefused):
        cparams.build(param("GCM_MESSAGE", iv=b"\0" * 12, iv_fixed_bits=0, iv_generator=0,
                            tag=b"\0" * 8, tag_bits=128))
    with pytest.raises(ParamRefused):
        cparams.build(param("CHACHA20", block_counter=b"", block_counter_bits=64,
                            nonce=b"\0" * 12, nonce_bits=96))


def test_param_table() -> None:
    assert paramtable.tag_accepted(c.CKM_AES_GCM, TAGS["GCM"])
    assert not paramtable.tag_accepted(c.CKM_AES_GCM, TAGS["BYTES"])
    assert paramtable.tag_accepted(c.CKM_AES_CBC_PAD, TAGS["BYTES"])
    assert paramtable.tag_accepted(c.CKM_PKCS5_PBKD2, TAGS["PKCS5_PBKD2_2"])
    assert paramtable.tag_accepted(0x8000_0001, TAGS["NONE"])
    assert not paramtable.raw_allowed(c.CKM_AES_GCM, True, True)
    assert paramtable.raw_allowed(0x8000_0001, True, True)
    assert not paramtable.raw_allowed(0x8000_0001, True, False)
    assert not paramtable.raw_allowed(0x8000_0001, False, True)


def test_toml_module_tables_with_initialize_arguments() -> None:
    cfg = toml_to_config(
        '[[listen]]\ntcp = "127.0.0.1:4444"\n\n[modules]\nsofthsm = "/x/softhsm.so"\n\n'
        '[modules.nss]\npath = "/x/softokn3.so"\ninit_reserved = "configdir=sql:/db"\n'
        'os_locking = false\nraw_mechanism_params = true\n\n[policy]\npreset = "none"\n',
        "test.toml")
    assert {m.alias: m.path for m in cfg.policy.modules} == {
        "softhsm": "/x/softhsm.so", "nss": "/x/softokn3.so"}
    init = cfg.module_init["nss"]
    assert (init.init_reserved, init.os_locking, init.raw_mechanism_params) == (
        "configdir=sql:/db", False, True)
    assert "softhsm" not in cfg.module_init


def test_toml_module_table_errors() -> None:
    from p11guard.policy.model import ConfigError

    for body in ('[modules.nss]\ninit_reserved = "x"\n',
                 '[modules.nss]\npath = "/x"\nbogus = 1\n',
                 '[modules.nss]\npath = "/x"\nos_locking = "yes"\n'):
        with pytest.raises(ConfigError):
            toml_to_config('[[listen]]\ntcp = "127.0.0.1:4444"\n' + body, "t.toml")
