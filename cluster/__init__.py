"""The `pdserve` cluster, by process: `gateway/` (HTTP and gRPC), `control/` (controller,
router, autoscaler), `workers/` (Ray actors); `serve.py` wires them together and `cli.py` is
the `pdserve` command."""
