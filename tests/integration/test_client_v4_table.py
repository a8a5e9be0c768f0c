"""The C client's protocol-v4 tables (p11g_procs.h) say what the Python side says.

No server needed: the header is compared with the Python sources it is
generated from, and compiled with a small probe that checks the structure
layouts (offsets and sizes) against the server's cffi declarations.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from p11guard.pkcs11 import attributes, paramtable
from p11guard.pkcs11.binding import ffi
from p11guard.wire import mechanisms as m4
from p11guard.wire import procedures as P

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "native" / "client"
HEADER = CLIENT / "p11g_procs.h"
KIND = {"H": "H", "O": "O", "L": "L", "TM": "X", "TP": "Y", "TT": "Z", "info": "i",
        "slot_info": "s", "token_info": "k", "session_info": "e", "mechanism_info": "n"}


def test_v4_rows_match_python_table() -> None:
    rows = re.findall(r'\{\.number = (\d+), \.name = "(\w+)", \.args = "(\w*)", '
                      r'\.result = "(\w+)"\}', HEADER.read_text())
    v4 = P.TABLES[P.VERSION_P11GUARD]
    assert len(rows) == len(v4) == 94
    for number, name, args, result in rows:
        proc = v4[int(number)]
        assert proc.name == name
        assert args == "".join(KIND[f.kind.value] for f in proc.args)
        assert result == "".join(KIND[f.kind.value] for f in proc.result)


def test_tags_mechanisms_and_attribute_kinds_match() -> None:
    text = HEADER.read_text()
    for tag, shape in m4.PARAMS.items():
        assert f"#define P11G_TAG_{shape.name} {tag}\n" in text
    pairs = re.findall(r"\{0x([0-9A-F]+)UL, 0x([0-9A-F]+)UL\},", text)
    table = {int(mech, 16): int(mask, 16) for mech, mask in pairs}
    assert table == {mech: sum(1 << t for t in tags)
                     for mech, tags in paramtable.ACCEPTED.items()}
    ulongs = re.search(r"p11g_attrs_ulong\[\] = \{([^}]*)\}", text)
    assert ulongs is not None
    got = {int(x.strip().rstrip("UL"), 16) for x in ulongs.group(1).split(",")}
    assert got == {t for t, k in attributes.KINDS.items() if k is attributes.AttrKind.ULONG}


def test_struct_layouts_match_the_server(tmp_path: Path) -> None:
    """offsetof/sizeof in the C client == the server's cffi view of the same structure."""
    probes = []
    expected = []
    for shape in m4.PARAMS.values():
        if not shape.c_struct or shape.c_struct == "CK_ULONG":
            continue
        ctype = f"p11g_{shape.c_struct}"
        probes.append(f'    printf("%zu\\n", sizeof({ctype}));')
        expected.append(ffi.sizeof(shape.c_struct))
        for fname, _ in ffi.typeof(shape.c_struct).fields:
            probes.append(f'    printf("%zu\\n", offsetof({ctype}, {fname}));')
            expected.append(ffi.offsetof(shape.c_struct, fname))
    src = tmp_path / "probe.c"
    src.write_text('#include <stdio.h>\n#include "p11g.h"\n#include "p11g_procs.h"\n'
                   "int main(void)\n{\n" + "\n".join(probes) + "\n    return 0;\n}\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-Wno-unused-variable",
                    "-Wno-unused-const-variable", "-I/usr/include/p11-kit-1", f"-I{CLIENT}",
                    str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    assert [int(x) for x in out.split()] == expected
