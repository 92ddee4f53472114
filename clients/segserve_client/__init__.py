"""segserve client library: talk to a segserve server and decode its masks (grpcio, protobuf, numpy)."""
