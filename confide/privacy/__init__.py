"""Privacy machinery of Confide: certificates and keys (``crypto``), and in time DP and SecAgg."""
