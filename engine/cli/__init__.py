"""The command line, one file per command group; options made from the config dataclasses; `engine info`."""
