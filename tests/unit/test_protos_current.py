"""The committed stubs are exactly what scripts/gen_protos.py makes from the .proto files."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_protos(tmp_path):
    fresh = _generator().generate(tmp_path)
    committed_root = ROOT / "protos"
    fresh_names = {p.relative_to(tmp_path) for p in fresh}
    committed = {p.relative_to(committed_root) for p in (committed_root / "inferplane").rglob("*")
                 if p.is_file() and p.suffix in {".py", ".pyi"}}
    assert fresh_names == committed, "stubs missing or stale: run `make protos`"
    stale = [str(n) for n in fresh_names if (tmp_path / n).read_bytes() != (committed_root / n).read_bytes()]
    assert not stale, f"stubs differ from the protos: {stale}; run `make protos`"


def test_protobuf_runs_on_upb():
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb", "pure-Python protobuf is up to 190x slower"


def test_every_enum_zero_is_unspecified():
    from inferplane.v1 import common_pb2

    for enum in common_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
