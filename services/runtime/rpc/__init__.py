"""The gRPC edge shared by every service: server bootstrap, auth, error mapping, JobService.
Only modules in this package (and each service's server.py) import grpc."""
