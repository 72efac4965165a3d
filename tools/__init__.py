"""The `dsv4` command line."""
