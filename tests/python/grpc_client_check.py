#!/usr/bin/env python3
"""A client nobody here wrote: Python grpcio against a running sd-serve.

Usage: grpc_client_check.py HOST:PORT [MODEL]

Generates the sd.v1 stubs from proto/ with grpc_tools.protoc into a temporary directory,
then checks grpc.health.v1 (overall and per model), ListModels, Generate (PNG with the
generation parameters in tEXt chunks, seed returned), GenerateStream (queued, progress,
result) and an INVALID_ARGUMENT naming the field. Exits non-zero on any failure.
"""

import os
import struct
import sys
import tempfile
import zlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_DIR = os.path.join(ROOT, "proto")


def generate_stubs(out_dir):
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(PROTO_DIR, "sd", "v1", "diffusion.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)


def png_text_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            chunks[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    return chunks


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    addr = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else ""
    with tempfile.TemporaryDirectory() as tmp:
        generate_stubs(tmp)
        from sd.v1 import diffusion_pb2 as pb
        from sd.v1 import diffusion_pb2_grpc as pb_grpc

        limit = 64 << 20
        channel = grpc.insecure_channel(
            addr,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        grpc.channel_ready_future(channel).result(timeout=30)

        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", model] if model else [""]:
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, (service, r)
        print("health: SERVING")

        stub = pb_grpc.DiffusionStub(channel)
        models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert models, "no models"
        name = model or models[0].name
        print("models:", ", ".join(f"{m.name} ({m.target}, {m.engine_id})" for m in models))

        req = pb.GenerateRequest(
            model=name,
            prompt="a python drew this",
            width=64,
            height=64,
            steps=2,
            seed=7,
            max_sequence_length=16,
            output_format=pb.OUTPUT_FORMAT_PNG,
        )
        resp = stub.Generate(req, timeout=60)
        assert list(resp.seeds) == [7], resp.seeds
        img = resp.images[0]
        assert img.media_type == "image/png" and (img.width, img.height) == (64, 64)
        text = png_text_chunks(img.data)
        assert "a python drew this" in text.get("parameters", ""), text
        assert "Seed: 7" in text["parameters"], text
        print(f"Generate: {len(img.data)} bytes PNG, parameters: {text['parameters']!r}")

        events = list(stub.GenerateStream(req, timeout=60))
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "result", kinds
        assert kinds.count("progress") == 2, kinds
        assert events[-1].result.images[0].data == img.data, "same seed, same image"
        print("GenerateStream:", kinds)

        bad = pb.GenerateRequest(model=name, prompt="x", width=65)
        try:
            stub.Generate(bad, timeout=10)
            raise AssertionError("width 65 was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert e.details().startswith("width"), e.details()
            print("bad input:", e.code(), e.details())
    print("python grpc client: OK")


if __name__ == "__main__":
    main()
