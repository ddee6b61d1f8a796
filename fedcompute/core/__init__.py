"""Domain types, state machines, errors, seams (clock, ids) and settings. No grpc, no sqlalchemy."""
