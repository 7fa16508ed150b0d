"""Benchmarks: the serving and training stacks side by side with what users would otherwise run.

Every figure worth quoting is a ratio measured in one run on one machine (see docs/benchmarks/).
"""
