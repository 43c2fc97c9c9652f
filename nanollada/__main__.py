"""``python -m nanollada`` -> the ``nanollada`` command."""

from nanollada.cli import main

main()
