"""The committed gRPC stubs are what generation.proto compiles to (no server needed)."""
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from orca_jax.proto import generation_pb2, generation_pb2_grpc, regenerate

ROOT = Path(regenerate.__file__).resolve().parent.parent.parent


def test_committed_descriptor_matches_the_proto():
    """Whatever protoc version: the schema baked into generation_pb2 is the .proto's."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        include = Path(grpc_tools.__file__).parent / "_proto"
        assert protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--descriptor_set_out={out}",
                            str(ROOT / regenerate.PROTO)]) == 0
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for msg in fresh.message_type:  # descriptor sets carry json_name; the python stubs omit it
        for field in msg.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(generation_pb2.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "generation_pb2.py is stale: run python -m orca_jax.proto.regenerate"


def test_committed_stubs_are_byte_identical_to_regenerated(capsys):
    """With the grpcio-tools the stubs were made with, regeneration changes nothing (another
    version writes a different header; then only the schema check above applies)."""
    made_with = generation_pb2_grpc.GRPC_GENERATED_VERSION
    installed = grpc_tools.__version__ if hasattr(grpc_tools, "__version__") else None
    if installed is None:
        from importlib.metadata import version
        installed = version("grpcio-tools")
    if installed != made_with:
        print(f"grpcio-tools {installed} here, stubs made with {made_with}: schema check only")
        return
    assert regenerate.main(["--check"]) == 0, capsys.readouterr().err


def test_generation_service_shape():
    svc = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert svc.full_name == "orca_jax.v1.Generation"
    gen = svc.methods_by_name["Generate"]
    assert gen.server_streaming and not gen.client_streaming
    assert not svc.methods_by_name["GetModelInfo"].server_streaming
