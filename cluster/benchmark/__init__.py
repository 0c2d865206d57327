"""The serving benchmark (`pdserve bench serve`, and bench/serving.py over the same code):
an OpenAI-compatible server driven over HTTP with seeded workloads, as `vllm bench serve`.

A client only: it talks HTTP to the server under test and imports no engine code (an
import-linter contract holds it to that), so it measures pdserve and any other
OpenAI-compatible server alike.

Definitions (those of `vllm bench serve`): a request's clock starts when it is sent, after
any --max-concurrency wait. TTFT is the arrival of the first chunk with content (text, chat
content or token ids: requests ask for `return_token_ids` where the server has it); ITL is
every gap between successive such chunks; E2E ends with the stream; TPOT = (E2E - TTFT) /
(output tokens - 1) over requests with more than one output token, the count coming from
the final `usage` (stream_options.include_usage). For goodput a one-token request's TPOT is
0. Percentiles interpolate linearly; ITL percentiles pool the gaps of all requests.

The modules, in the order a run uses them:

    arguments  the flags, shared by both entry points, and their checks
    workload   token-id datasets (random, shared-prefix, mixed), arrivals, BenchError
    chat       chat workloads (short-chats, mixed) from the text in prompts
    launch     the server of a run: --url as given, or a `pdserve serve` started for it
    flavors    the extra fields each kind of server needs to produce exactly max_tokens
    client     streamed requests timed into records; the load loop with its warm-up
    stats      per-request records to latency statistics, throughputs and goodput
    report     the printed tables and the JSON file
    peer       another server measured after the first, and the ratios between them
    run        one run from flags to result; command: to exit status, JSON and --plot
    plot       the --plot PNG (matplotlib, the `bench` extra)
"""
