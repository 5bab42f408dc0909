"""Generated gRPC stubs for proto/headwise/v1 (`make proto`; never edit the *_pb2*.py files).

    from services.protos.headwise.v1 import generate_pb2, generate_pb2_grpc
    from services.protos.headwise.v1 import kvstore_pb2, kvstore_pb2_grpc
"""
