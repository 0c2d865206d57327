"""What prefill and decode workers share: configs, models, weights, KV pool, runner, sampler."""
