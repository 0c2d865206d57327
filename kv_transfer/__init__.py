"""The prefill->decode hop, both halves on both sides: messages, the decode side (remote
requests: reserve, poll, complete, fail, expire) and its receiver, the prefill side (page
cursor) and its pusher, the only page<->bytes code (`layout`), and the transports."""
