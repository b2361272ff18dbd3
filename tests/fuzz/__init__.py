"""Property-based tests (hypothesis) of the parsers that read input from elsewhere."""
