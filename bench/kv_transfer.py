"""KV transfer: each transport vs raw TCP `sendall` of the same bytes, same run.

Part 1 (bandwidth): a decode process holds a SmolLM2-shaped KV pool (30 layers, 3 KV
heads of 64, float32, 16-token pages) behind a listener per transport and a plain TCP
server. The bench process holds a prefill pool of the same shape and pushes the KV of a
1k- and an 8k-token prompt from it layer by layer, as the prefill worker's pusher does
(`send_pool_pages`: one chunk per layer, then TransferDone), timing each transfer end to
end: for the copying transports that includes packing the pages, for nixl there is no
pack (the decode process reads the prefill pool in place). Also timed, for reference: the
copying transports sending already-packed bytes (`packed`) and nixl with its checksums
taken beforehand (`hashed`), as their pushers do on the engine thread; raw TCP `sendall` of the same
bytes in the same chunks, acknowledged with one byte; and the floor of any transfer
between two processes that copies once, `process_vm_readv` of the same pages from pool to
pool (`one-copy floor`, the kernel call UCX's same-host path uses).

Part 2 (TTFT): SmolLM2 prefill and decode engines in two processes, linked by a real
transport; time to first token of a 1k-token prompt, disaggregated vs prefilled by the
decode process itself, and the share of the transfer hidden behind the prefill compute.

Both parts run once per KV cache dtype (`--kv-cache-dtypes`, default float32 and int8):
a quantized pool's pages move as stored (values and their per-row scales), so each part
also prints bytes per token and, per transport, int8's transfer time against float32's.

    python bench/kv_transfer.py [--repeats 10] [--transports grpc,tcp,gloo,shm,nixl]
                                [--kv-cache-dtypes float32,int8] [--tokens 1024,8192] [--no-ttft]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch
from common import machine_line, percentile

PAGE = 16
LAYOUT = {"num_layers": 30, "num_blocks": 600, "block_size": PAGE, "num_kv_heads": 3, "head_dim": 64}
# --kv-cache-dtypes names -> (pool dtype, the CacheConfig.kv_cache_dtype of the engines in part 2)
KV_DTYPES = {"float32": (torch.float32, "auto"), "int8": (torch.int8, "int8"), "fp8": (torch.float8_e4m3fn, "fp8")}


def _decode_side(kinds, dtype_name, commands, replies):
    torch.set_num_threads(1)
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.transports import listen
    from pdserve.runtime.kv_pool import KVPool

    pool = KVPool(**LAYOUT, dtype=KV_DTYPES[dtype_name][0])
    receiver = KVReceiver(pool)
    listeners = {kind: listen(kind, receiver) for kind in kinds}
    server = socket.create_server(("127.0.0.1", 0))
    replies.put(({k: v.address for k, v in listeners.items()}, server.getsockname()[1]))
    while (command := commands.get()) is not None:
        if command[0] == "readv":  # the one-copy floor: pull the same pages straight from the sender's pool
            _, pid, remote_bases, num_pages = command
            replies.put(_process_vm_read(pool, pid, remote_bases, num_pages))
            continue
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


def _pool_tensors(pool) -> list:
    """The pool's memory: its values and, quantized, its scales (same layout on both sides)."""
    return [pool.kv] if pool.scales is None else [pool.kv, pool.scales]


def _process_vm_read(pool, pid: int, remote_bases: list[int], num_pages: int) -> float:
    """Seconds to copy pages 0..num_pages of every layer's k and v (and their scales) out
    of process `pid`'s pool (same layout, its tensors at `remote_bases`) into this pool
    with process_vm_readv: one copy."""
    import ctypes

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    started = time.perf_counter()
    for tensor, remote_base in zip(_pool_tensors(pool), remote_bases):
        run_bytes = num_pages * tensor[0, 0, 0].numel() * tensor.element_size()
        for layer in range(tensor.shape[0]):
            for kv in (0, 1):
                offset = tensor[layer, kv].data_ptr() - tensor.data_ptr()
                local, remote = IoVec(tensor.data_ptr() + offset, run_bytes), IoVec(remote_base + offset, run_bytes)
                if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != run_bytes:
                    raise OSError(ctypes.get_errno(), "process_vm_readv failed")
    return time.perf_counter() - started


def _header(ticket, layer: int, num_pages: int, checksum: int):
    from pdserve.kv_transfer import layout

    return layout.pages_header(ticket, ticket.layout, layer, 0, num_pages, checksum)


def _transfer_from_pool(channel, ticket, source, blocks, checksums=None) -> float:
    """The pusher's path: each layer's pages out of the pool (`send_pool_pages`), then done.
    `checksums`: the layers' checksums taken beforehand, as the pusher takes them on the
    engine thread when a layer is computed (else each is taken here, from memory)."""
    from pdserve.kv_transfer import layout
    from pdserve.kv_transfer.messages import TransferDone

    started = time.perf_counter()
    for layer in range(source.kv.shape[0]):
        checksum = checksums[layer] if checksums else layout.checksum_pages(source, layer, blocks)
        channel.send_pool_pages(_header(ticket, layer, len(blocks), checksum), source, blocks, wait=False)
    channel.send_done(TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, 0, 0.0))
    return time.perf_counter() - started


def _transfer_packed(channel, ticket, payloads) -> float:
    """Bytes packed beforehand, one chunk per layer, then done."""
    from pdserve.kv_transfer import layout
    from pdserve.kv_transfer.messages import TransferDone

    num_pages = len(ticket.block_ids)
    started = time.perf_counter()
    for layer, payload in enumerate(payloads):
        channel.send_pages(_header(ticket, layer, num_pages, layout.checksum(payload)), payload, wait=False)
    channel.send_done(TransferDone(ticket.request_id, ticket.ticket_id, ticket.secret, 0, 0.0))
    return time.perf_counter() - started


def bandwidth(kinds: list[str], repeats: int, dtype_name: str = "float32",
              token_counts: tuple[int, ...] = (1024, 8192)) -> dict[tuple[int, str], float]:
    """Print GB/s and p99 per transport and size for a KV pool of `dtype_name`; return the
    median seconds of each."""
    from pdserve.kv_transfer import layout, messages
    from pdserve.kv_transfer.transports import connect
    from pdserve.runtime.kv_pool import KVPool

    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_decode_side, args=(kinds, dtype_name, commands, replies), daemon=True)
    child.start()
    addresses, tcp_port = replies.get(timeout=120)
    medians = {}
    try:
        source = KVPool(**LAYOUT, dtype=KV_DTYPES[dtype_name][0])
        source.fill_random()
        for tokens in token_counts:
            num_pages = tokens // PAGE
            blocks = list(range(num_pages))
            payloads = [layout.to_bytes(layout.read_pages(source, layer, blocks))
                        for layer in range(LAYOUT["num_layers"])]
            total = sum(len(p) for p in payloads)
            medians[(tokens, "bytes")] = total
            print(f"{dtype_name} KV, {tokens} tokens: {total / 1e6:.1f} MB in {len(payloads)} layer chunks, "
                  f"{total / tokens:.0f} bytes per token", flush=True)
            results = {}
            for kind in kinds:
                channel = connect(addresses[kind], timeout=120)
                # " packed": pages packed beforehand, as the pusher packs them on the engine
                # thread; " hashed": the same for a transport that reads the pool in place,
                # whose pusher only hashes the pages on the engine thread.
                checksums = [layout.checksum_pages(source, layer, blocks) for layer in range(LAYOUT["num_layers"])]
                for variant in ("", " hashed" if channel.reads_pool else " packed"):
                    times = []
                    for _ in range(repeats):
                        commands.put(("ticket", num_pages))
                        ticket = messages.decode(replies.get(timeout=60), messages.KVTicket)
                        if variant == " packed":
                            times.append(_transfer_packed(channel, ticket, payloads))
                        else:
                            times.append(_transfer_from_pool(channel, ticket, source, blocks,
                                                             checksums if variant == " hashed" else None))
                        commands.put(("release", ticket.ticket_id))
                        replies.get(timeout=60)
                    results[kind + variant] = times
                channel.close()
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
            results["one-copy floor"] = []
            for _ in range(repeats):
                commands.put(("readv", os.getpid(), [t.data_ptr() for t in _pool_tensors(source)], num_pages))
                results["one-copy floor"].append(replies.get(timeout=60))
            tcp_rate = total / statistics.median(results["raw tcp"])
            for kind, times in results.items():
                medians[(tokens, kind)] = statistics.median(times)
                rate = total / statistics.median(times)
                print(f"  {kind:14s} {rate / 1e9:6.2f} GB/s (median)  p99 {1000 * percentile(times, 99):7.1f} ms"
                      f"  vs raw TCP {rate / tcp_rate:5.2f}x", flush=True)
            for a, b in (("nixl hashed", "shm packed"), ("nixl", "shm"), ("nixl hashed", "one-copy floor"),
                         ("shm", "grpc")):
                if a in results and b in results:
                    ratio = statistics.median(results[b]) / statistics.median(results[a])
                    print(f"  {a} vs {b}: {ratio:.2f}x")
    finally:
        commands.put(None)
        child.join(30)
        if child.is_alive():
            child.kill()
    return medians


def compare_dtypes(medians: dict[str, dict[tuple[int, str], float]]) -> None:
    """Each quantized dtype's bytes and transfer times against float32's, same run."""
    if "float32" not in medians:
        return
    base = medians["float32"]
    for name, results in medians.items():
        if name == "float32":
            continue
        for (tokens, kind), seconds in results.items():
            if kind == "bytes":
                print(f"{name} vs float32, {tokens} tokens: {seconds / base[(tokens, kind)]:.3f}x the bytes")
            elif (tokens, kind) in base:
                print(f"{name} vs float32, {tokens} tokens, {kind:14s}: {seconds / base[(tokens, kind)]:.2f}x the time")


def _ttft_decode(kind, kv_cache_dtype, commands, replies):
    """Decode worker process: SmolLM2 engine behind a KV listener; reports first-token times."""
    torch.set_num_threads(1)
    from pdserve.engine.engine import EngineCore
    from pdserve.kv_transfer import messages
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.transports import listen
    from pdserve.runtime.config import CacheConfig
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams

    model = load_model("smollm2-135m-instruct", cache=CacheConfig(num_blocks=300, kv_cache_dtype=kv_cache_dtype))
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


def _ttft_prefill(kv_cache_dtype, commands, replies):
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

    model = load_model("smollm2-135m-instruct", cache=CacheConfig(num_blocks=300, kv_cache_dtype=kv_cache_dtype))
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


def ttft(kind: str, prompt_len: int, standalone_transfer: float | None, trials: int = 4,
         dtype_name: str = "float32") -> None:
    """TTFT of one prompt with prefill and decode in separate processes, vs the decode
    process prefilling it itself; both engines keep their KV cache in `dtype_name`."""
    ctx = mp.get_context("spawn")
    d_commands, d_replies, p_commands, p_replies = (ctx.Queue() for _ in range(4))
    kv_cache_dtype = KV_DTYPES[dtype_name][1]
    decode = ctx.Process(target=_ttft_decode, args=(kind, kv_cache_dtype, d_commands, d_replies), daemon=True)
    prefill = ctx.Process(target=_ttft_prefill, args=(kv_cache_dtype, p_commands, p_replies), daemon=True)
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
    print(f"TTFT {prompt_len}-token prompt, {dtype_name} KV, prefill and decode processes linked by {kind}: "
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
    parser.add_argument("--transports", default="grpc,tcp,gloo,shm,nixl")
    parser.add_argument("--ttft-transport", default="nixl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-dtypes", default="float32,int8",
                        help=f"KV pool dtypes to measure, comma-separated, of {', '.join(KV_DTYPES)}")
    parser.add_argument("--tokens", default="1024,8192", help="prompt lengths of part 1, comma-separated")
    parser.add_argument("--ttft-trials", type=int, default=4)
    parser.add_argument("--no-ttft", action="store_true", help="part 1 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    token_counts = tuple(int(t) for t in args.tokens.split(","))
    medians = {}
    for name in args.kv_cache_dtypes.split(","):
        if name not in KV_DTYPES:
            parser.error(f"unknown KV cache dtype {name!r}; expected one of {', '.join(KV_DTYPES)}")
        medians[name] = bandwidth(args.transports.split(","), args.repeats, name, token_counts)
    compare_dtypes(medians)
    if not args.no_ttft:
        for name, results in medians.items():
            ttft(args.ttft_transport, 1024, results.get((1024, args.ttft_transport)), args.ttft_trials, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
