"""The authserver benchmark: `python -m bench [--quick]`.

Every figure is a ratio against a baseline measured in the same run (rounds
alternate A B A B and medians are quoted), plus the server's CPU time per
request read from /proc, because the machine it runs on is shared and noisy.
"""
