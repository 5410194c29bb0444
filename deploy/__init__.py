"""Host side: export, INT8, packaging, the latency-targeted build search and remote device control."""
