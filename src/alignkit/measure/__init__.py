"""Measurement: the probe job (harmful compliance, over-refusal and sycophancy with intervals), the
statistics behind the intervals, and the report."""
