"""The control plane: worker membership and health (controller), routing, autoscaling, and the
backend that carries a request across the Ray workers."""
