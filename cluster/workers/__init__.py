"""The worker processes: Ray actors wrapping the prefill and decode engines, their specs and stats."""
