"""Hardware probes: one module per source; ``probes.base`` holds the contract."""
