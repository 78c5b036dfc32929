"""The gRPC API (`orca_jax.v1`): `generation.proto` and the Python stubs generated from it.

The stubs are committed (not built at install time) so that installing orca-jax needs no
protoc and no build hook; `python -m orca_jax.proto.regenerate` rewrites them after an edit
to the .proto, and tests/test_server_proto.py fails while the two disagree.
"""
