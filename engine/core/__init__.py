"""What every layer stands on: the expected-error type, the workspace and its run records, devices, safetensors checks, roles."""
