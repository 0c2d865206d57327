"""KV transfer: each transport vs raw TCP `sendall` of the same bytes, same run.

Part 1 (bandwidth): a decode process holds a SmolLM2-shaped KV pool (30 layers, 3 KV
heads of 64, float32, 16-token pages) behind a listener per transport and a plain TCP
server. The bench process pushes the KV of a 1k- and an 8k-token prompt layer by layer
(one chunk per layer, then TransferDone) and times each transfer end to end; the raw TCP
peer `sendall`s the same bytes in the same chunks and waits for a one-byte ack.

Part 2 (TTFT): SmolLM2 prefill and decode engines in two processes, linked by a real
transport; time to first token of a 1k-token prompt, disaggregated vs prefilled by the
decode process itself, and the share of the transfer hidden behind the prefill compute.

    python bench/kv_transfer.py [--repeats 10] [--transports grpc,tcp,gloo,shm]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time

import torch
from common import machine_line, percentile

PAGE = 16
LAYOUT = {"num_layers": 30, "num_blocks": 600, "block_size": PAGE, "num_kv_heads": 3, "head_dim": 64}


def _decode_side(kinds, commands, replies):
    torch.set_num_threads(1)
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.transports import listen
    from pdserve.runtime.kv_pool import KVPool

    pool = KVPool(**LAYOUT, dtype=torch.float32)
    receiver = KVReceiver(pool)
    listeners = {kind: listen(kind, receiver) for kind in kinds}
    server = socket.create_server(("127.0.0.1", 0))
    replies.put(({k: v.address for k, v in listeners.items()}, server.getsockname()[1]))
    while (command := commands.get()) is not None:
        if command[0] == "ticket":
            ticket = receiver.issue("bench", list(range(command[1])), 0, command[1] * PAGE, timeout=120)
            replies.put(messages.encode(ticket))
        elif command[0] == "release":
            receiver.release(command[1])
            replies.put("ok")
        elif command[0] == "tcp":  # accept one connection, read exactly n bytes per chunk, ack
            _, chunk_bytes, num_chunks = command
            conn, _ = server.accept()
            buffer = bytearray(chunk_bytes)
            view = memoryview(buffer)
            for _ in range(num_chunks):
                got = 0
                while got < chunk_bytes:
                    got += conn.recv_into(view[got:], chunk_bytes - got)
            conn.sendall(b"\x01")
            conn.close()
    for listener in listeners.values():
        listener.close()


def _transfer_once(channel, ticket, pages_by_layer, payloads) -> float:
    from pdserve.kv_transfer import layout
    from pdserve.kv_transfer.messages import PagesHeader, TransferDone

    started = time.perf_counter()
    for layer, (pages, payload) in enumerate(zip(pages_by_layer, payloads)):
        channel.send_pages(PagesHeader(
            ticket.request_id, ticket.ticket_id, ticket.secret, layer, 0, pages.shape[1], "float32",
            tuple(pages.shape), len(payload), layout.checksum(payload)), payload)
    channel.send_done(TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, 0, 0.0))
    return time.perf_counter() - started


def bandwidth(kinds: list[str], repeats: int) -> dict[tuple[int, str], float]:
    """Print GB/s and p99 per transport and size; return the median seconds of each."""
    from pdserve.kv_transfer import layout, messages
    from pdserve.kv_transfer.transports import connect

    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_decode_side, args=(kinds, commands, replies), daemon=True)
    child.start()
    addresses, tcp_port = replies.get(timeout=120)
    medians = {}
    try:
        for tokens in (1024, 8192):
            num_pages = tokens // PAGE
            pages_by_layer = [torch.randn(2, num_pages, PAGE, 3, 64) for _ in range(LAYOUT["num_layers"])]
            payloads = [layout.to_bytes(p) for p in pages_by_layer]
            total = sum(len(p) for p in payloads)
            print(f"{tokens} tokens: {total / 1e6:.1f} MB of KV in {len(payloads)} layer chunks", flush=True)
            results = {}
            for kind in kinds:
                channel = connect(addresses[kind], timeout=120)
                times = []
                for _ in range(repeats):
                    commands.put(("ticket", num_pages))
                    ticket = messages.decode(replies.get(timeout=60), messages.KVTicket)
                    times.append(_transfer_once(channel, ticket, pages_by_layer, payloads))
                    commands.put(("release", ticket.ticket_id))
                    replies.get(timeout=60)
                channel.close()
                results[kind] = times
            times = []
            for _ in range(repeats):
                commands.put(("tcp", len(payloads[0]), len(payloads)))
                with socket.create_connection(("127.0.0.1", tcp_port)) as sock:
                    started = time.perf_counter()
                    for payload in payloads:
                        sock.sendall(payload)
                    sock.recv(1)
                    times.append(time.perf_counter() - started)
            results["raw tcp"] = times
            tcp_rate = total / statistics.median(results["raw tcp"])
            for kind, times in results.items():
                medians[(tokens, kind)] = statistics.median(times)
                rate = total / statistics.median(times)
                print(f"  {kind:8s} {rate / 1e9:6.2f} GB/s (median)  p99 {1000 * percentile(times, 99):7.1f} ms"
                      f"  vs raw TCP {rate / tcp_rate:5.2f}x", flush=True)
            if "grpc" in results and "shm" in results:
                ratio = statistics.median(results["grpc"]) / statistics.median(results["shm"])
                print(f"  shared memory vs gRPC: {ratio:.2f}x")
    finally:
        commands.put(None)
        child.join(30)
        if child.is_alive():
            child.kill()
    return medians


def _ttft_decode(kind, commands, replies):
    """Decode worker process: SmolLM2 engine behind a KV listener; reports first-token times."""
    torch.set_num_threads(1)
    from pdserve.engine.engine import EngineCore
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.transports import listen
    from pdserve.runtime.config import CacheConfig
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams

    model = load_model("smollm2-135m-instruct", cache=CacheConfig(num_blocks=300))
    receiver = KVReceiver(model.runner.pool)
    engine = EngineCore(model.runner, model.info, kv_receiver=receiver, enable_prefix_caching=False)
    listener = listen(kind, receiver)
    replies.put(listener.address)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    while (command := commands.get()) is not None:
        op, request_id, prompt = command
        if op == "remote":
            replies.put(messages.encode(engine.add_remote_request(request_id, prompt, params)))
        else:
            engine.add_request(request_id, prompt, params)
        while engine.has_unfinished:
            if engine.step():
                replies.put(time.time())
            elif op == "remote":
                time.sleep(0.0002)  # waiting for the KV: let the listener thread run
    listener.close()


def _ttft_prefill(commands, replies):
    """Prefill worker process: SmolLM2 prefill engine pushing to the decode process."""
    torch.set_num_threads(1)
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.messages import PrefillJob
    from pdserve.kv_transfer.pusher import KVPusher
    from pdserve.kv_transfer.transports import connect
    from pdserve.prefill_worker.engine import PrefillEngine
    from pdserve.runtime.config import CacheConfig
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams

    model = load_model("smollm2-135m-instruct", cache=CacheConfig(num_blocks=300))
    pusher = KVPusher(model.runner.pool, connect)
    engine = PrefillEngine(model.runner, model.info, pusher, enable_prefix_caching=False)
    replies.put("ready")
    while (command := commands.get()) is not None:
        ticket, address, prompt = command
        engine.add_job(PrefillJob(messages.decode(ticket, messages.KVTicket), address, prompt,
                                  SamplingParams(max_tokens=1, temperature=0.0)))
        while engine.scheduler.has_work:
            engine.step()
        replies.put(time.time())  # the last layer's pages are queued for sending
        while engine.has_unfinished:
            engine.step()
            time.sleep(0.0002)
    pusher.close()


def ttft(kind: str, prompt_len: int, standalone_transfer: float | None, trials: int = 4) -> None:
    """TTFT of one prompt with prefill and decode in separate processes, vs the decode
    process prefilling it itself."""
    ctx = mp.get_context("spawn")
    d_commands, d_replies, p_commands, p_replies = (ctx.Queue() for _ in range(4))
    decode = ctx.Process(target=_ttft_decode, args=(kind, d_commands, d_replies), daemon=True)
    prefill = ctx.Process(target=_ttft_prefill, args=(p_commands, p_replies), daemon=True)
    decode.start()
    prefill.start()
    try:
        address = d_replies.get(timeout=300)
        p_replies.get(timeout=300)
        g = torch.Generator().manual_seed(0)
        disagg, colocated, tails = [], [], []
        for trial in range(trials + 1):  # the first round warms both up
            prompt = torch.randint(100, 49000, (prompt_len,), generator=g).tolist()
            started = time.time()
            d_commands.put(("remote", f"d{trial}", prompt))
            p_commands.put((d_replies.get(timeout=60), address, prompt))
            last_layer_queued = p_replies.get(timeout=300)
            first_token = d_replies.get(timeout=300)
            started_local = time.time()
            d_commands.put(("local", f"c{trial}", prompt))
            first_local = d_replies.get(timeout=300)
            if trial:
                disagg.append(first_token - started)
                tails.append(first_token - last_layer_queued)
                colocated.append(first_local - started_local)
    finally:
        d_commands.put(None)
        p_commands.put(None)
        for process in (decode, prefill):
            process.join(30)
            if process.is_alive():
                process.kill()
    d, c, tail = (statistics.median(x) for x in (disagg, colocated, tails))
    print(f"TTFT {prompt_len}-token prompt, prefill and decode processes linked by {kind}: "
          f"disaggregated {1000 * d:.0f} ms, colocated {1000 * c:.0f} ms; added {1000 * (d - c):.0f} ms "
          f"({100 * (d - c) / c:.1f}% of TTFT; includes the two processes' own compute-speed "
          f"difference); first token {1000 * tail:.1f} ms after the last layer was computed: the "
          f"transfer adds {100 * tail / d:.2f}% to TTFT")
    if standalone_transfer:
        print(f"layer-wise overlap hides {100 * (1 - tail / standalone_transfer):.0f}% of the "
              f"{1000 * standalone_transfer:.1f} ms a standalone {prompt_len}-token transfer takes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--transports", default="grpc,tcp,gloo,shm")
    parser.add_argument("--ttft-transport", default="shm")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    medians = bandwidth(args.transports.split(","), args.repeats)
    ttft(args.ttft_transport, 1024, medians.get((1024, args.ttft_transport)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
