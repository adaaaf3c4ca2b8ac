"""The command line: parses arguments, calls the core, prints tables or JSON."""
