"""Generated protobuf and gRPC modules for zerop2p.proto (see scripts/gen_proto.py)."""
