"""Domain XML -> validated, immutable models (no I/O beyond reading the document)."""
