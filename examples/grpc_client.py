"""Stream a completion from a pdserve gateway over gRPC, with the stubs in pdserve.proto.

    python examples/grpc_client.py "The sky is" --address 127.0.0.1:50051 --max-tokens 32
    python examples/grpc_client.py "Tell me a story" --chat --api-key "$PDSERVE_API_KEY"
    python examples/grpc_client.py "Count to ten" --abort-after 3

The text goes to stdout as it arrives; the finish reason and token counts go to stderr.
`--abort-after N` calls Abort after N messages: the stream then ends with "abort".
"""

from __future__ import annotations

import argparse
import sys

import grpc

from pdserve.proto import serving_pb2, serving_pb2_grpc


def build_request(args: argparse.Namespace) -> serving_pb2.GenerateRequest:
    request = serving_pb2.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        request.chat.messages.add(role="user", content=args.prompt)
    else:
        request.text = args.prompt
    if args.seed is not None:
        request.seed = args.seed
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--address", default="127.0.0.1:50051", help="the gateway's gRPC host:port")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="sent as `authorization: Bearer <key>`")
    parser.add_argument("--abort-after", type=int, default=None, metavar="N",
                        help="call Abort after receiving N messages")
    parser.add_argument("--timeout", type=float, default=60.0, help="the call's deadline in seconds")
    args = parser.parse_args(argv)

    metadata = () if args.api_key is None else (("authorization", f"Bearer {args.api_key}"),)
    with grpc.insecure_channel(args.address) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        try:
            last = None
            for count, response in enumerate(stub.Generate(build_request(args), timeout=args.timeout,
                                                           metadata=metadata), start=1):
                print(response.text, end="", flush=True)
                last = response
                if count == args.abort_after and not response.finish_reason:
                    stub.Abort(serving_pb2.AbortRequest(request_id=response.request_id), metadata=metadata)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print()
    if last is not None:
        usage = last.usage
        print(f"[{last.request_id}] finish_reason={last.finish_reason} prompt_tokens={usage.prompt_tokens} "
              f"completion_tokens={usage.completion_tokens} cached_tokens={usage.cached_tokens}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
