"""Coverage-guided fuzzing (atheris) of what parses untrusted input: the data plane's framing, gRPC
chunk parsing, the job spec and the working_dir check. A crash is any exception other than the
documented ones. Run it alone, or through ``pytest -m fuzz`` (tests/fuzz/test_fuzz.py):

    python tests/fuzz/fuzz_inputs.py -runs=20000 [corpus_dir]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from gradhub.proto import frames
    from gradhub.proto.codec import chunk_parser
    from gradhub.proto.contract.errors import ProtocolError, SpecError
    from gradhub.proto.contract.spec import JobSpec
    from gradhub.proto.v1 import ps_pb2
    from gradhub.server.working_dirs import check_zip

_parse_chunk = chunk_parser(ps_pb2.PushChunk)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if which == 0:
            if len(rest) >= frames.PREFIX.size:
                frames.header_length(rest[:frames.PREFIX.size], frames.MAX_HEADER_BYTES)
            frames.parse_header(rest[frames.PREFIX.size:])
        elif which == 1:
            _parse_chunk(rest)
        elif which == 2:
            JobSpec.from_json(rest)
        else:
            check_zip(rest)
    except (ProtocolError, SpecError, DecodeError):
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
