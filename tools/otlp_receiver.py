"""An OpenTelemetry trace receiver for Doppel's tests, on both OTLP transports: HTTP
(POST /v1/traces, protobuf) and gRPC (TraceService/Export). Requests are decoded with the
official opentelemetry-proto definitions (PyPI), so what Doppel exports is checked by an
implementation that is not Doppel's.

Prints one JSON line with the two ports, then one JSON line per span received:
transport, service name, span name, trace id, span id, parent span id (hex), attributes.

With `--tls CERT KEY CLIENT_CA`, both listeners speak TLS with that certificate and key
and require a client certificate signed by CLIENT_CA (mutual TLS).
"""

import argparse
import json
import ssl
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def emit(request, transport):
    with LOCK:
        for rs in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    line = {
                        "transport": transport,
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    }
                    print(json.dumps(line), flush=True)


class Http(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        emit(request, "http")
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


class Grpc(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        emit(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CLIENT_CA"))
    args = parser.parse_args()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Http)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Grpc(), server)
    if args.tls:
        cert, key, client_ca = args.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        http.socket = context.wrap_socket(http.socket, server_side=True)
        read = lambda path: open(path, "rb").read()
        credentials = grpc.ssl_server_credentials(
            [(read(key), read(cert))],
            root_certificates=read(client_ca),
            require_client_auth=True,
        )
        grpc_port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"http": http.server_address[1], "grpc": grpc_port}), flush=True)
    http.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
