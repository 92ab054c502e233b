"""The ``kvcompress`` command: one module per subcommand."""
