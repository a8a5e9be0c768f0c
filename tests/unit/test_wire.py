"""The sans-IO wire layer: XDR, record marking, RPC messages, the procedure codecs."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p11guard.wire import rpc
from p11guard.wire.codec import PROCEDURE_CODECS, Limits, empty_value, rv_only_result
from p11guard.wire.procedures import BY_NAME, BY_NUMBER, PROCEDURES, Kind
from p11guard.wire.xdr import Packer, Unpacker, XdrError


def test_table_has_all_69_procedures() -> None:
    assert len(PROCEDURES) == 69
    assert sorted(BY_NUMBER) == list(range(2, 71))
    for proc in PROCEDURES:
        assert proc.result[0].name == "rv"


# --- golden bytes captured from Debian's Caml Crush client (protocol reference §1.4) ---

def test_setup_arch_call_golden() -> None:
    body = PROCEDURE_CODECS[2].args.encode((1,))
    record = rpc.call(0x1234, 4, 3, 2, body)
    framed = rpc.frame(record)
    assert framed.hex() == (
        "80000030" "00001234" "00000000" "00000002" "00000004" "00000003" "00000002"
        "00000000" "00000000" "00000000" "00000000" "0000000000000001"
    )


def test_setup_arch_reply_golden() -> None:
    framed = rpc.frame(rpc.success_reply(7, PROCEDURE_CODECS[2].result.encode((1,))))
    assert framed.hex() == "80000020" "00000007" "00000001" + "00000000" * 4 + "0000000000000001"


def test_load_module_argument_golden() -> None:
    assert PROCEDURE_CODECS[70].args.encode((b"softhsm",)).hex() == "00000007736f667468736d00"


def test_find_objects_init_template_golden() -> None:
    template = [(0x0, (3).to_bytes(8, "little"), 8), (0x102, b"\x01", 1)]
    body = BY_NAME["FindObjectsInit"]
    encoded = PROCEDURE_CODECS[body.number].args.encode((1, template))
    assert encoded.hex() == (
        "0000000000000001" "00000002"
        "0000000000000000" "00000008" "0300000000000000" "0000000000000008"
        "0000000000000102" "00000001" "01000000" "0000000000000001"
    )


def test_sign_init_golden() -> None:
    encoded = PROCEDURE_CODECS[42].args.encode((1, (0x40, b""), 2))
    assert encoded.hex() == "0000000000000001" "0000000000000040" "00000000" "0000000000000002"


def test_version_encoding_golden() -> None:
    info = empty_value(Kind.INFO)
    info["cryptoki_version"] = (2, 40)
    encoded = PROCEDURE_CODECS[5].result.encode((0, info))
    assert encoded[8:24].hex() == "00000001020000000000000128000000"


# --- XDR bounds -------------------------------------------------------------------

def test_opaque_bound_is_checked_before_slicing() -> None:
    p = Packer()
    p.uint(0x7FFFFFFF)
    with pytest.raises(XdrError):
        Unpacker(p.getvalue()).opaque(1 << 20)


def test_array_count_checked_against_remaining_bytes() -> None:
    p = Packer()
    p.uint(1_000_000)
    with pytest.raises(XdrError):
        Unpacker(p.getvalue()).count(10_000_000, 8)


def test_template_attribute_limit() -> None:
    codec = PROCEDURE_CODECS[BY_NAME["FindObjectsInit"].number].args
    template = [(i, b"", 0) for i in range(10)]
    data = codec.encode((1, template))
    with pytest.raises(XdrError):
        codec.decode(data, Limits(max_attributes=5))


def test_trailing_garbage_rejected() -> None:
    codec = PROCEDURE_CODECS[BY_NAME["Logout"].number].args
    with pytest.raises(XdrError):
        codec.decode(codec.encode((1,)) + b"\0\0\0\0")


def test_negative_rv_travels_as_twos_complement() -> None:
    encoded = PROCEDURE_CODECS[2].result.encode((-1,))
    assert encoded == b"\xff" * 8
    assert PROCEDURE_CODECS[2].result.decode(encoded) == ((1 << 64) - 1,)


# --- record marking -------------------------------------------------------------------

def test_multi_fragment_reassembly_any_chunking() -> None:
    record = bytes(range(256)) * 1000
    stream = rpc.frame(record, max_fragment=65532) + rpc.frame(b"second")
    for chunk in (1, 3, 4096, len(stream)):
        reader = rpc.RecordReader(1 << 20)
        for i in range(0, len(stream), chunk):
            reader.feed(stream[i : i + chunk])
        assert list(reader.records()) == [record, b"second"]


def test_record_size_bound_before_buffering() -> None:
    reader = rpc.RecordReader(1024)
    with pytest.raises(rpc.RecordTooLarge):
        reader.feed((0x80000000 | 4096).to_bytes(4, "big"))


def test_fragment_count_bound() -> None:
    reader = rpc.RecordReader(1024, max_fragments=10)
    with pytest.raises(rpc.RecordTooLarge):
        reader.feed(b"\0\0\0\0" * 20)


# --- RPC messages -------------------------------------------------------------------------

def test_parse_call_and_replies() -> None:
    call = rpc.parse_call(rpc.call(9, 4, 3, 16, b"\0" * 8))
    assert (call.xid, call.program, call.version, call.procedure) == (9, 4, 3, 16)
    mismatch = rpc.parse_reply(rpc.prog_mismatch_reply(9, 3, 3))
    assert mismatch.accept_stat is rpc.AcceptStat.PROG_MISMATCH and mismatch.detail == (3, 3)
    denied = rpc.parse_reply(rpc.auth_error_reply(9, rpc.AuthStat.AUTH_TOOWEAK))
    assert not denied.accepted and denied.detail == (5,)
    assert rpc.parse_reply(rpc.proc_unavail_reply(1)).accept_stat is rpc.AcceptStat.PROC_UNAVAIL
    assert rpc.parse_reply(rpc.garbage_args_reply(1)).accept_stat is rpc.AcceptStat.GARBAGE_ARGS


def test_rpc_version_mismatch_is_answered() -> None:
    p = Packer()
    for word in (5, 0, 3, 4, 3, 2, 0, 0, 0, 0):
        p.uint(word)
    with pytest.raises(rpc.BadCall) as info:
        rpc.parse_call(p.getvalue())
    reply = rpc.parse_reply(info.value.reply)
    assert reply.reject_stat is rpc.RejectStat.RPC_MISMATCH


# --- round trips over every procedure ----------------------------------------------------

_values = {
    Kind.HYPER: st.integers(0, (1 << 64) - 1),
    Kind.OPAQUE: st.binary(max_size=64),
    Kind.MECHANISM: st.tuples(st.integers(0, (1 << 64) - 1), st.binary(max_size=32)),
    Kind.TEMPLATE: st.lists(
        st.tuples(st.integers(0, (1 << 64) - 1), st.binary(max_size=16),
                  st.integers(0, (1 << 64) - 1)), max_size=5),
    Kind.HYPER_LIST: st.lists(st.integers(0, (1 << 64) - 1), max_size=8),
}


@pytest.mark.parametrize("proc", PROCEDURES, ids=lambda p: p.name)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_every_procedure_round_trips(proc, data) -> None:  # type: ignore[no-untyped-def]
    codec = PROCEDURE_CODECS[proc.number]
    args = tuple(data.draw(_values[f.kind]) for f in proc.args)
    assert codec.args.decode(codec.args.encode(args)) == args
    result = rv_only_result(proc, 0x150)
    decoded = codec.result.decode(codec.result.encode(result))
    assert decoded[0] == 0x150


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=256))
def test_decoders_only_raise_xdr_error_on_garbage(blob: bytes) -> None:
    for codec in PROCEDURE_CODECS.values():
        for side in (codec.args, codec.result):
            with contextlib.suppress(XdrError):
                side.decode(blob, Limits(max_record_size=4096, max_opaque=4096))


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=512))
def test_record_reader_and_parsers_never_crash(blob: bytes) -> None:
    reader = rpc.RecordReader(1024)
    try:
        reader.feed(blob)
    except rpc.RecordTooLarge:
        return
    for record in reader.records():
        with contextlib.suppress(rpc.RpcError):
            rpc.parse_call(record)
        with contextlib.suppress(rpc.RpcError):
            rpc.parse_reply(record)
