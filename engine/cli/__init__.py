"""The command line's helpers: options made from the config dataclasses, `engine info`."""
