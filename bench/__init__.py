"""The authserver benchmark: `python -m bench [--quick]`.

authserver runs as `authserver serve` runs it, and every figure is a ratio to a
baseline measured in the same run: a peer in its own process (bench/peers: a
bare FastAPI app, and a minimal app that only signs a token), or bcrypt's own
speed. Rounds alternate A B A B and the median of the per-round ratios is
quoted, beside the CPU time per request of each serving process read from
/proc, because the machine it runs on is shared and noisy.
"""
