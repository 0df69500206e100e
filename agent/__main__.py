"""``python -m agent`` is ``agentctl``."""

from agent.cli import main

main()
